"""Operators called directly with a minimal context: config resolution, XCom
shape, and that errors a retry cannot fix fail the task at once."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import (
    SNAPSHOT_ASSET,
    CollectDataOperator,
    PromoteModelOperator,
    TrainGPUOperator,
    ValidateDataOperator,
)


@pytest.fixture
def ctx(nightshift_home):
    return {"run_id": "manual__test", "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}


def test_collect_bundled_pushes_small_json_and_asset_digest(ctx, tmp_path):
    op = CollectDataOperator(task_id="collect")
    out = op.execute(ctx)
    assert out["counts"]["total"] == 1797 and out["image_shape"] == [8, 8, 1]
    assert out["snapshot_uri"].startswith(str(tmp_path / "artifacts" / "snapshots"))
    assert ctx["outlet_events"][SNAPSHOT_ASSET].extra["digest"] == out["digest"]
    assert op.outlets == [SNAPSHOT_ASSET]


def test_collect_unknown_class_fails_without_retry(ctx, make_imagefolder):
    root = make_imagefolder(classes=("0", "1"), per_class=3)
    op = CollectDataOperator(task_id="collect", source=str(root), classes=["0"])
    with pytest.raises(AirflowFailException, match=r"DataError.*\['1'\]"):
        op.execute(ctx)


def test_validate_fails_on_corrupt_file_with_readable_list(ctx, make_imagefolder):
    root = make_imagefolder(classes=("0", "1", "2"), per_class=30, corrupt=1)
    snap = CollectDataOperator(task_id="collect", source=str(root), image_shape=[8, 8, 1]).execute(ctx)
    assert snap["undecodable"] == 1
    op = ValidateDataOperator(task_id="validate", snapshot=snap, min_rows=10)
    with pytest.raises(AirflowFailException, match="corrupt_0.png"):
        op.execute(ctx)


def test_validate_passes_on_bundled(ctx):
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    out = ValidateDataOperator(task_id="validate", snapshot=snap).execute(ctx)
    assert out["success"] is True and out["evaluated"] >= 8


def test_validate_without_upstream_result_says_which_task(ctx):
    with pytest.raises(AirflowFailException, match="collect_data"):
        ValidateDataOperator(task_id="validate", snapshot=None).execute(ctx)


def test_train_require_gpu_fails_fast_without_cuda(ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, require_gpu=True, hparams={"epochs": 1})
    with pytest.raises(AirflowFailException, match="GPUUnavailable.*require_gpu=True"):
        op.execute(ctx)


def test_train_logs_to_mlflow(ctx):
    from nightshift import registry

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-test", hparams={"epochs": 2, "width": 8})
    out = op.execute(ctx)
    c = registry.client(op.settings.mlflow_tracking_uri)
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["metrics"]["test_accuracy"])
    assert len(c.get_metric_history(out["run_id"], "val_accuracy")) == 2
    assert run.data.tags["nightshift.data_digest"] == snap["digest"]


def test_promote_requires_upstream_results(ctx):
    op = PromoteModelOperator(task_id="promote", snapshot={"snapshot_uri": "x"}, validation={"success": True},
                              training=None, export={}, image={}, system_eval={})
    with pytest.raises(AirflowFailException, match="train_gpu"):
        op.execute(ctx)


@pytest.fixture
def candidate(ctx):
    """collect -> train -> export for real, with the operators; image and system eval given."""
    from nightshift.operators import ExportONNXOperator

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    train = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-promote",
                             hparams={"epochs": 3, "width": 8}).execute(ctx)
    export = ExportONNXOperator(task_id="export", training=train, snapshot=snap, model_name="op-promote").execute(ctx)
    from nightshift.data.snapshot import load_snapshot

    # what system_eval reports: the served accuracy on n test images (all of them were served)
    served = {"accuracy": train["metrics"]["test_accuracy"], "errors": 0, "latency_ms": {"p95": 2.0, "p99": 3.0},
              "throughput_rps": 500.0, "n": load_snapshot(snap["snapshot_uri"]).count("test")}
    return {"snapshot": snap, "validation": {"success": True}, "training": train, "export": export,
            "image": {"image": "nightshift/op-promote:x"}, "system_eval": served}


@pytest.mark.parametrize("kw, match", [
    ({"opset": 17}, "ONNX opset 17 is not supported"),
    ({"opset": "latest"}, "opset must be an integer"),
    ({"atol": 0}, "atol"),
    ({"min_top1_agreement": 1.5}, "min_top1_agreement"),
    ({"int8_max_accuracy_drop": -0.1}, "int8_max_accuracy_drop"),
])
def test_export_bad_config_fails_fast_before_any_work(ctx, kw, match):
    from nightshift.operators import ExportONNXOperator

    op = ExportONNXOperator(task_id="export", training=None, snapshot=None, **kw)
    with pytest.raises(AirflowFailException, match=f"ConfigError.*{match}"):
        op.execute(ctx)


def test_export_logs_parity_and_batch_checks_to_mlflow(ctx, candidate):
    from nightshift import registry

    export, train = candidate["export"], candidate["training"]
    assert export["variant"] == "fp32" and export["quantization"] is None
    assert set(export["parity"]["batch_checks"]) == {"1", "64"}
    assert export["model_meta"]["training_run_id"] == train["run_id"] and export["model_meta"]["opset"] == 20
    from nightshift.settings import Settings

    c = registry.client(Settings.from_env().mlflow_tracking_uri)
    metrics = c.get_run(train["run_id"]).data.metrics
    assert metrics["parity_passed"] == 1.0 and metrics["parity_batch1_passed"] == 1.0
    assert metrics["parity_batch64_passed"] == 1.0 and metrics["onnx_opset"] == 20
    assert metrics["parity_max_abs_diff"] == pytest.approx(export["parity"]["max_abs_diff_logits"])
    logged = {f.path for f in c.list_artifacts(train["run_id"], "onnx")}
    assert {"onnx/parity.json", "onnx/model.json", "onnx/model.onnx"} <= logged

    # quantize (templated strings, as the DAG's Params render them): report + metrics + artifact
    from nightshift.operators import ExportONNXOperator

    q_export = ExportONNXOperator(task_id="export", training=train, snapshot=candidate["snapshot"],
                                  model_name="op-promote", opset="20", quantize="True",
                                  int8_max_accuracy_drop="1.0").execute(ctx)
    q = q_export["quantization"]
    assert q["decision"] == "kept" and q_export["variant"] == "int8" and q_export["model_meta"]["variant"] == "int8"
    metrics = c.get_run(train["run_id"]).data.metrics
    assert metrics["int8_kept"] == 1.0 and metrics["int8_size_bytes"] == q["int8"]["size_bytes"]
    assert metrics["int8_accuracy_drop"] == pytest.approx(q["accuracy_drop"])
    logged = {f.path for f in c.list_artifacts(train["run_id"], "onnx")}
    assert {"onnx/quantization.json", "onnx/model.fp32.onnx"} <= logged


def test_promote_without_thresholds_refuses_and_records_it(ctx, candidate):
    from nightshift import registry

    op = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds={"min_accuracy": 0.1}, gates_file="",
                              **candidate)
    out = op.execute(ctx)
    assert out["promoted"] is False and "no threshold is configured" in out["reason"]
    c = registry.client(op.settings.mlflow_tracking_uri)
    assert registry.get_champion(c, "op-promote") is None
    assert c.get_model_version("op-promote", out["version"]).tags["nightshift.decision"] == "NOT_BLESSED"


def test_promote_blesses_and_fail_on_reject_raises(ctx, candidate):
    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    op = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate)
    out = op.execute(ctx)
    assert out["promoted"] and out["champion"] == out["version"]
    # the evidence the decision stood on: the test split's size, each accuracy with its interval
    assert out["evidence"]["test_images"] == candidate["snapshot"]["counts"]["per_split"]["test"]
    assert len(out["evidence"]["accuracies"]["offline_accuracy"]["ci95"]) == 2
    c = registry.client(op.settings.mlflow_tracking_uri)
    champion = registry.get_champion(c, "op-promote")
    assert champion["tags"]["nightshift.snapshot_uri"] == candidate["snapshot"]["snapshot_uri"]

    # A second candidate (another training run, so another run folder: the first run's train/last.pt
    # would refuse these other hparams) that fails a gate, with fail_on_reject.
    train2 = TrainGPUOperator(task_id="train", snapshot=candidate["snapshot"], model_name="op-promote",
                              hparams={"epochs": 1, "width": 8, "seed": 1}).execute(ctx | {"run_id": "manual__test2"})
    strict = loose | {"min_accuracy": 1.01}
    op = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=strict, gates_file="", fail_on_reject=True,
                              **(candidate | {"training": train2}))
    with pytest.raises(Exception, match="not promoted.*offline_accuracy"):
        op.execute(ctx)
    assert registry.get_champion(c, "op-promote")["version"] == out["version"]
    rejected = c.get_model_version_by_alias("op-promote", "challenger")
    assert rejected.version != out["version"]  # the newest candidate is the challenger, champion untouched
    vs = json.loads(rejected.tags["gate.vs_champion"])
    assert set(vs["observed"]) >= {"candidate", "champion"}  # champion re-scored on the same split


def test_promote_retried_registers_one_version_and_keeps_the_first_decision(ctx, candidate):
    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    first = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="",
                                 **candidate).execute(ctx)
    retry = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="",
                                 **candidate).execute(ctx)
    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    assert len(c.search_model_versions("name = 'op-promote'")) == 1
    assert retry["version"] == first["version"] == "1" and retry["reused"] is True
    assert retry["promoted"] is True and retry["previous_champion"] is None  # not "itself"
    assert {g["name"] for g in retry["gates"]} >= {"offline_accuracy", "vs_champion"}
    assert registry.get_champion(c, "op-promote")["version"] == "1"


def ctx_home(ctx) -> str:
    import os

    return os.environ["NIGHTSHIFT_HOME"]


def _deny(*_a, **_k):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    raise MlflowException("access to the model registry denied", error_code=PERMISSION_DENIED)


def test_registry_errors_fail_drift_check_and_promote_instead_of_passing(ctx, candidate, monkeypatch):
    from mlflow import MlflowClient

    from nightshift.errors import RegistryError
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftCheckOperator

    monkeypatch.setattr(MlflowClient, "get_registered_model", _deny)
    monkeypatch.setattr(MlflowClient, "search_model_versions", _deny)
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):  # retryable: not an AirflowFailException
        DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    monkeypatch.undo()
    from nightshift import registry

    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    assert c.search_registered_models() == [] or not c.search_model_versions("name = 'op-promote'")


def test_drift_check_without_champion_then_against_it(ctx, candidate):
    from nightshift.operators import DriftCheckOperator
    from nightshift.gates import THRESHOLD_KEYS

    first = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert first["status"] == "no_reference" and first["drift_detected"] is False
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    second = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert second["status"] == "ok" and second["drift_detected"] is False and second["drifted_share"] == 0.0
    assert second["champion_version"] == "1"
    assert Path(second["report_html"]).is_file()


def test_drift_monitor_skips_without_champion_then_compares_served_traffic(ctx, candidate, tmp_path):
    from datetime import datetime, timedelta, timezone

    import numpy as np
    from airflow.sdk.exceptions import AirflowSkipException

    from nightshift import contracts
    from nightshift.data.snapshot import load_snapshot
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftMonitorOperator
    from tests.unit.served_traffic import served_records

    t0 = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)
    window = {"window_start": t0.isoformat(), "window_end": (t0 + timedelta(hours=1)).isoformat()}
    op = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, **window)
    with pytest.raises(AirflowSkipException, match="no champion"):
        op.execute(ctx)
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    snap = load_snapshot(candidate["snapshot"]["snapshot_uri"])
    x, _ = snap.split("train")
    dark = (x[np.random.default_rng(1).permutation(len(x))[:300]] // 3).astype(np.uint8)
    version = candidate["export"]["onnx_sha256"][:12]
    recs = served_records(dark, candidate["export"]["onnx_path"], snap.class_names, t0 + timedelta(minutes=1),
                          version=version)
    recs[0]["model_version"] = "an-older-champion"
    log_dir = contracts.request_log_dir(op.settings.artifact_root, "op-promote")
    log_dir.mkdir(parents=True)
    (log_dir / "requests-1.jsonl").write_text("".join(json.dumps(r | {"model_name": "op-promote"}) + "\n"
                                                      for r in recs))
    out = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, **window).execute(ctx)
    assert out["status"] == "ok" and out["drift_detected"] is True and out["n_current"] == 299
    assert out["served_versions"] == {version: 299, "an-older-champion": 1}
    timeline = list(contracts.read_jsonl(contracts.drift_timeline_path(op.settings.artifact_root, "op-promote")))
    assert timeline[-1]["drift_detected"] is True and timeline[-1]["champion_version"] == "1"
    # an hour whose traffic all came from another model: not enough data, and the reason says so
    later = t0 + timedelta(hours=1)
    (log_dir / "requests-2.jsonl").write_text("".join(
        json.dumps(r | {"model_name": "op-promote", "model_version": "an-older-champion"}) + "\n"
        for r in served_records(dark[:80], candidate["export"]["onnx_path"], snap.class_names,
                                later + timedelta(minutes=1), version="an-older-champion")))
    quiet = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, window_start=later.isoformat(),
                                 window_end=(later + timedelta(hours=1)).isoformat()).execute(ctx)
    assert quiet["status"] == "not_enough_data" and quiet["served_versions"] == {"an-older-champion": 80}
    assert "80 other request(s)" in quiet["message"] and "an-older-champion" in quiet["message"]
    assert version in quiet["message"] and "serving the champion" in quiet["message"]
    timeline = list(contracts.read_jsonl(contracts.drift_timeline_path(op.settings.artifact_root, "op-promote")))
    assert timeline[-1]["status"] == "not_enough_data" and "an-older-champion" in timeline[-1]["message"]


def test_promote_model_and_rollback_record_who_and_why(ctx, tmp_path):
    from types import SimpleNamespace

    from nightshift import contracts, registry
    from nightshift.gates import Decision
    from nightshift.operators import SetChampionOperator

    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"x")
    for i, blessed in enumerate([True, True, False], start=1):
        with registry.training_run(c, "exp", f"r{i}", tags={}, params={},
                                   artifact_location=(tmp_path / "art").as_uri()) as run_id:
            registry.log_artifacts(c, run_id, tmp_path / "onnx", "onnx")
        base = registry.get_champion(c, "m")
        d = Decision("BLESSED" if blessed else "NOT_BLESSED", f"c{i}", base["version"] if base else None)
        out = registry.register_candidate(c, "m", run_id, artifact_path="onnx", tags={"onnx_sha256": str(i) * 64},
                                          decision=d)
        contracts.append_history(ctx_home(ctx) + "/artifacts", contracts.HistoryEvent(
            model="m", action="promoted" if blessed else "rejected", version=out["version"],
            previous_champion=out["previous_champion"], champion=out["champion"], reason="test"))
    assert registry.get_champion(c, "m")["version"] == "2"
    ctx = ctx | {"dag_run": SimpleNamespace(triggering_user_name="alice")}

    with pytest.raises(AirflowFailException, match="needs a reason"):
        SetChampionOperator(task_id="p", model_name="m", version="3", reason=" ", action="forced").execute(ctx)
    back = SetChampionOperator(task_id="r", model_name="m", version="previous", reason="v2 misroutes cats",
                               action="rolled_back").execute(ctx)
    assert back["champion"] == "1" and back["previous_champion"] == "2" and back["actor"] == "alice"
    forced = SetChampionOperator(task_id="p", model_name="m", version="v3", reason="gates cannot judge new classes",
                                 action="forced").execute(ctx)
    assert forced["champion"] == "3" and registry.get_champion(c, "m")["version"] == "3"
    tags = c.get_model_version("m", "3").tags
    assert tags["nightshift.forced_by"] == "alice" and tags["nightshift.forced_from"] == "1"
    events = list(contracts.read_jsonl(contracts.history_path(ctx_home(ctx) + "/artifacts", "m")))
    assert [e["action"] for e in events][-2:] == ["rolled_back", "forced"]
    with pytest.raises(Exception, match="no version 9"):
        SetChampionOperator(task_id="p", model_name="m", version="9", reason="x", action="forced").execute(ctx)


def test_approval_path_moves_champion_only_when_a_person_approves(ctx, candidate):
    from airflow.sdk.exceptions import AirflowSkipException

    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.run_notes import run_note
    from nightshift.operators import FinalizePromotionOperator, PromotionApprovalOperator

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    out = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", require_approval=True,
                               **candidate).execute(ctx)
    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    assert out["awaiting_approval"] is True and out["promoted"] is False
    assert registry.get_champion(c, "op-promote") is None  # nothing moves before the answer
    with pytest.raises(AirflowSkipException):  # nothing to ask when no approval is pending
        PromotionApprovalOperator(task_id="approve", promotion={"awaiting_approval": False}).execute(ctx)

    rejected = FinalizePromotionOperator(task_id="finalize", model_name="op-promote", promotion=out, approval={
        "chosen_options": ["Reject"], "responded_by_user": {"id": "u2", "name": "carol"},
        "params_input": {"comment": "wait for the new labels"}}).execute(ctx)
    assert rejected["promoted"] is False and registry.get_champion(c, "op-promote") is None
    report = Path(out["report_path"])  # <artifact root>/runs/<dag>/<run>/promotion.json

    def note() -> str:
        return run_note(report.parents[3], report.parent.parent.name, report.parent.name) or ""

    # the run note follows the person's answer, not the promote step's "waiting"
    assert json.loads(report.read_text())["awaiting_approval"] is False
    assert "NOT PROMOTED" in note() and "Rejected by carol: wait for the new labels" in note()
    assert "waiting for approval" not in note()
    approved = FinalizePromotionOperator(task_id="finalize", model_name="op-promote", promotion=out, approval={
        "chosen_options": ["Approve"], "responded_by_user": {"id": "u1", "name": "bob"},
        "params_input": {"comment": "numbers look right"}}).execute(ctx)
    assert approved["promoted"] is True and approved["champion"] == out["version"]
    assert approved["report_path"] == str(report)
    assert note().startswith(f"[nightshift] PROMOTED op-promote v{out['version']}") and "Approved by bob" in note()
    tags = c.get_model_version("op-promote", out["version"]).tags
    assert tags["nightshift.approved_by"] == "bob" and tags["nightshift.approval_comment"] == "numbers look right"
    passthrough = FinalizePromotionOperator(task_id="finalize", model_name="op-promote",
                                            promotion={"promoted": False, "version": "9"}).execute(ctx)
    assert passthrough == {"promoted": False, "version": "9"}


def test_a_run_that_loosens_the_gate_file_waits_for_approval(ctx, candidate, tmp_path):
    """The gate file is the reviewed policy: a Param may tighten it and promote at once, but a
    looser one (a lower floor here) leaves champion alone until a person approves, and says why
    in the outcome, the run note and the approval request."""
    from nightshift import registry
    from nightshift.run_notes import run_note
    from nightshift.operators import FinalizePromotionOperator, PromotionApprovalOperator

    gates = tmp_path / "gates.yaml"
    gates.write_text("thresholds:\n  min_accuracy: 0.1\n  max_p95_latency_ms: 100\n  max_p99_latency_ms: 100\n"
                     "  min_throughput_rps: 0\n  served_accuracy_tolerance: 0\n  champion_tolerance: 0\n"
                     "  champion_relative_tolerance: 0\n  min_test_images: 100\n  champion_alpha: 0.05\n")
    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    loosened = PromoteModelOperator(task_id="promote", model_name="op-loosen", gates_file=str(gates),
                                    thresholds={"min_accuracy": 0.05, "max_p95_latency_ms": None},
                                    **candidate).execute(ctx)
    assert loosened["awaiting_approval"] is True and loosened["promoted"] is False
    assert registry.get_champion(c, "op-loosen") is None
    (why,) = loosened["loosened_thresholds"]
    assert "min_accuracy=0.05" in why and "0.1" in why and str(gates) in why
    report = Path(loosened["report_path"])  # <artifact root>/runs/<dag>/<run>/promotion.json
    note = run_note(report.parents[3], report.parent.parent.name, report.parent.name)
    assert note is not None and "waiting for approval" in note and "min_accuracy=0.05" in note
    approval = PromotionApprovalOperator(task_id="approve", promotion=loosened)
    with pytest.raises(Exception):  # no HITL backend in a unit test; the body is built first
        approval.execute(ctx)
    assert "loosened the gate file" in approval.body and "min_accuracy=0.05" in approval.body
    retried = PromoteModelOperator(task_id="promote", model_name="op-loosen", gates_file=str(gates),
                                   thresholds={"min_accuracy": 0.05}, **candidate).execute(ctx)
    assert retried["reused"] and retried["awaiting_approval"] is True  # a retry keeps the first decision
    assert retried["loosened_thresholds"] == loosened["loosened_thresholds"]
    assert registry.get_champion(c, "op-loosen") is None
    # after the answer the note still says what was loosened: that is what the person approved
    approved = FinalizePromotionOperator(task_id="finalize", model_name="op-loosen", promotion=loosened, approval={
        "chosen_options": ["Approve"], "responded_by_user": {"id": "u4", "name": "dave"},
        "params_input": {"comment": "known label noise"}}).execute(ctx)
    assert approved["promoted"] is True and registry.get_champion(c, "op-loosen")["version"] == loosened["version"]
    note = run_note(report.parents[3], report.parent.parent.name, report.parent.name) or ""
    assert "Approved by dave: known label noise" in note and "Approval needed" not in note
    assert "This run loosened the gate file:" in note and "min_accuracy=0.05" in note

    tightened = PromoteModelOperator(task_id="promote", model_name="op-tighten", gates_file=str(gates),
                                     thresholds={"max_p95_latency_ms": 50.0}, **candidate).execute(ctx)
    assert tightened["loosened_thresholds"] == [] and tightened["promoted"] is True
    assert registry.get_champion(c, "op-tighten")["version"] == tightened["version"]


def test_drift_check_with_an_unreadable_champion_reference_reports_it_and_goes_on(ctx, candidate, tmp_path):
    import json as _json

    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftCheckOperator

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    out = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    old = tmp_path / "format1"
    old.mkdir()
    (old / "manifest.json").write_text(_json.dumps({"format": 1, "digest": "x"}))  # an older Nightshift's snapshot
    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    c.set_model_version_tag("op-promote", out["version"], "nightshift.snapshot_uri", str(old))
    res = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert res["status"] == "reference_unavailable" and "format 1" in res["message"]
    assert res["drift_detected"] is False and res["champion_version"] == out["version"]


def test_train_records_data_lineage_and_plots_in_mlflow(ctx):
    """What a person sees in the MLflow run: the snapshot as dataset input, lineage tags (the
    code's git commit from the training manifest), the manifest and both figures; the resume
    state (last.pt) stays in the run folder."""
    from nightshift import registry
    from nightshift.lineage import git_sha

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-see", hparams={"epochs": 2, "width": 8})
    out = op.execute(ctx)
    c = registry.client(op.settings.mlflow_tracking_uri)
    run = c.get_run(out["run_id"])
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == snap["digest"][:36] and ds.dataset.source_type == "nightshift_snapshot"
    assert json.loads(ds.dataset.source)["uri"] == snap["snapshot_uri"]
    assert json.loads(ds.dataset.profile)["counts"]["total"] == 1797
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    tags = run.data.tags
    assert tags["nightshift.torch_version"] and tags["nightshift.device_name"]
    assert tags["mlflow.source.git.commit"] == tags["nightshift.git_sha"] == git_sha() != "unknown"
    listed = {f.path for f in c.list_artifacts(out["run_id"], "train")}
    assert {"train/train_manifest.json", "train/checkpoint.pt", "train/plots"} <= listed
    assert "train/last.pt" not in listed and (Path(out["train_dir"]) / "last.pt").is_file()
    assert {f.path for f in c.list_artifacts(out["run_id"], "train/plots")} == {
        "train/plots/curves.png", "train/plots/confusion_matrix.png"}


def test_approval_passes_reject_on_to_finalize_and_never_approves_by_default():
    """ApprovalOperator skips its downstream task on Reject; ours hands the answer to
    finalize_promotion, which records it. An approval default (approve on timeout) is refused."""
    from datetime import datetime, timezone

    from nightshift.operators import PromotionApprovalOperator

    op = PromotionApprovalOperator(task_id="approve", promotion={"awaiting_approval": True})
    assert op.response_timeout is not None
    answer = op.execute_complete({"ti": None, "task": op}, {
        "chosen_options": ["Reject"], "params_input": {"comment": "no"},
        "responded_at": datetime.now(timezone.utc), "responded_by_user": {"id": "u", "name": "carol"}})
    assert answer["chosen_options"] == ["Reject"]  # returned for finalize, no skip attempted (ti is None)
    with pytest.raises(ValueError, match="must not approve by default"):
        PromotionApprovalOperator(task_id="approve2", promotion={}, defaults=["Approve"])
