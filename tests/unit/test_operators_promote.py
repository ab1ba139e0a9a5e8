"""PromoteModelOperator (nightshift.operators.promote) on a candidate collected, trained and exported
by the operators: fail closed without thresholds or on a registry error, one version per retried
run, and the way to a person's approval."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import (
    PromoteModelOperator,
    TrainGPUOperator,
)

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_promote_requires_upstream_results(ctx):
    op = PromoteModelOperator(task_id="promote", snapshot={"snapshot_uri": "x"}, validation={"success": True},
                              training=None, export={}, image={}, system_eval={})
    with pytest.raises(AirflowFailException, match="train_gpu"):
        op.execute(ctx)


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
    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
    assert len(c.search_model_versions("name = 'op-promote'")) == 1
    assert retry["version"] == first["version"] == "1" and retry["reused"] is True
    assert retry["promoted"] is True and retry["previous_champion"] is None  # not "itself"
    assert {g["name"] for g in retry["gates"]} >= {"offline_accuracy", "vs_champion"}
    assert registry.get_champion(c, "op-promote")["version"] == "1"


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

    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
    assert c.search_registered_models() == [] or not c.search_model_versions("name = 'op-promote'")


def test_approval_path_moves_champion_only_when_a_person_approves(ctx, candidate):
    from airflow.sdk.exceptions import AirflowSkipException

    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import (
        FinalizePromotionOperator,
        PromotionApprovalOperator,
    )
    from nightshift.run_notes import run_note

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    out = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", require_approval=True,
                               **candidate).execute(ctx)
    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
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
    from nightshift.operators import (
        FinalizePromotionOperator,
        PromotionApprovalOperator,
    )
    from nightshift.run_notes import run_note

    gates = tmp_path / "gates.yaml"
    gates.write_text("thresholds:\n  min_accuracy: 0.1\n  max_p95_latency_ms: 100\n  max_p99_latency_ms: 100\n"
                     "  min_throughput_rps: 0\n  served_accuracy_tolerance: 0\n  champion_tolerance: 0\n"
                     "  champion_relative_tolerance: 0\n  min_test_images: 100\n  champion_alpha: 0.05\n")
    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
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
