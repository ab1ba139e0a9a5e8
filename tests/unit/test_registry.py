from __future__ import annotations

import pytest

from nightshift import registry
from nightshift.gates import Evidence, decide

T = {"min_accuracy": 0.5, "max_p95_latency_ms": 100.0, "served_accuracy_tolerance": 0.05, "champion_tolerance": 0.0}


@pytest.fixture
def mlflow_client(tmp_path):
    return registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _run(c, tmp_path, acc: float) -> str:
    (tmp_path / "onnx").mkdir(exist_ok=True)
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"fake-but-present")
    with registry.training_run(c, "exp", "r", tags={}, params={"epochs": 1},
                               artifact_location=(tmp_path / "art").as_uri()) as run_id:
        registry.log_metrics(c, run_id, {"test_accuracy": acc})
        registry.log_artifacts(c, run_id, tmp_path / "onnx", "onnx")
    return run_id


def _decide(acc, champion=None):
    ev = Evidence(True, acc, True, acc, 10.0, 0, champion["acc"] if champion else None,
                  champion["version"] if champion else None)
    return decide("cand", ev, T)


def test_blessed_candidate_becomes_champion_and_rejected_leaves_it(mlflow_client, tmp_path):
    c = mlflow_client
    assert registry.get_champion(c, "m") is None
    r1 = _run(c, tmp_path, 0.9)
    out1 = registry.register_candidate(c, "m", r1, artifact_path="onnx", tags={"offline_accuracy": 0.9},
                                       decision=_decide(0.9))
    assert out1["promoted"] and out1["champion"] == out1["version"] == "1"
    champ = registry.get_champion(c, "m")
    assert champ["version"] == "1" and champ["tags"]["nightshift.offline_accuracy"] == "0.9"

    r2 = _run(c, tmp_path, 0.8)
    out2 = registry.register_candidate(c, "m", r2, artifact_path="onnx", tags={"offline_accuracy": 0.8},
                                       decision=_decide(0.8, {"acc": 0.9, "version": "1"}))
    assert not out2["promoted"] and out2["version"] == "2" and out2["champion"] == "1"
    mv = c.get_model_version("m", "2")
    assert mv.tags["nightshift.decision"] == "NOT_BLESSED"
    assert "vs_champion" in mv.tags["nightshift.reason"]
    assert '"passed": false' in mv.tags["gate.vs_champion"]
    assert registry.get_champion(c, "m")["version"] == "1"


def test_failed_training_run_is_marked_failed(mlflow_client, tmp_path):
    c = mlflow_client
    with pytest.raises(RuntimeError):
        with registry.training_run(c, "exp", "r", tags={}, params={}) as run_id:
            raise RuntimeError("boom")
    assert c.get_run(run_id).info.status == "FAILED"
