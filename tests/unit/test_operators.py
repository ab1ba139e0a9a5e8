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
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
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
    served = {"accuracy": train["metrics"]["test_accuracy"], "errors": 0, "latency_ms": {"p95": 2.0}}
    return {"snapshot": snap, "validation": {"success": True}, "training": train, "export": export,
            "image": {"image": "nightshift/op-promote:x"}, "system_eval": served}


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

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0}
    op = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, **candidate)
    out = op.execute(ctx)
    assert out["promoted"] and out["champion"] == out["version"]
    c = registry.client(op.settings.mlflow_tracking_uri)
    champion = registry.get_champion(c, "op-promote")
    assert champion["tags"]["nightshift.snapshot_uri"] == candidate["snapshot"]["snapshot_uri"]

    # A second candidate (another training run) that fails a gate, with fail_on_reject.
    train2 = TrainGPUOperator(task_id="train", snapshot=candidate["snapshot"], model_name="op-promote",
                              hparams={"epochs": 1, "width": 8, "seed": 1}).execute(ctx)
    strict = loose | {"min_accuracy": 1.01}
    op = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=strict, fail_on_reject=True,
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

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0}
    first = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose,
                                 **candidate).execute(ctx)
    retry = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose,
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
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0}
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, **candidate).execute(ctx)
    monkeypatch.undo()
    from nightshift import registry

    c = registry.client(f"sqlite:///{ctx_home(ctx)}/mlflow.db")
    assert c.search_registered_models() == [] or not c.search_model_versions("name = 'op-promote'")


def test_drift_check_without_champion_then_against_it(ctx, candidate):
    from nightshift.operators import DriftCheckOperator
    from nightshift.gates import THRESHOLD_KEYS

    first = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert first["status"] == "no_reference" and first["drift_detected"] is False
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0}
    PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, **candidate).execute(ctx)
    second = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert second["status"] == "ok" and second["drift_detected"] is False and second["drifted_share"] == 0.0
    assert second["champion_version"] == "1"
    assert Path(second["report_html"]).is_file()
