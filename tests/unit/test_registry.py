from __future__ import annotations

import pytest

from nightshift import registry
from nightshift.gates import Evidence, decide

T = {"min_accuracy": 0.5, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 200.0, "min_throughput_rps": 10.0,
     "served_accuracy_tolerance": 0.05, "champion_tolerance": 0.0, "champion_relative_tolerance": 0.0,
     "min_test_images": 100, "champion_alpha": 0.0}


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
                  champion["version"] if champion else None, p99_latency_ms=20.0, throughput_rps=100.0,
                  test_images=1000, served_images=1000)
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


def _permission_denied(*_args, **_kwargs):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    raise MlflowException("User 'airflow' lacks READ on registered model", error_code=PERMISSION_DENIED)


def test_missing_model_or_alias_means_no_champion_but_other_errors_fail_closed(mlflow_client, monkeypatch):
    from nightshift.errors import RegistryError

    c = mlflow_client
    assert registry.get_champion(c, "never-registered") is None
    c.create_registered_model("no-alias-yet")
    assert registry.get_champion(c, "no-alias-yet") is None
    monkeypatch.setattr(c, "get_registered_model", _permission_denied)
    with pytest.raises(RegistryError, match="PERMISSION_DENIED.*Nothing is promoted") as exc:
        registry.get_champion(c, "no-alias-yet")
    assert exc.value.retryable


def test_unreachable_tracking_server_is_an_error_not_no_champion(monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = registry.client(f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as exc:
        registry.get_champion(c, "m")
    assert "Connection refused" in str(exc.value) or "Max retries" in str(exc.value) or "RegistryError" in repr(exc.value)


def test_registering_the_same_run_twice_makes_one_version_and_moves_champion_once(mlflow_client, tmp_path, monkeypatch):
    c = mlflow_client
    r1 = _run(c, tmp_path, 0.9)
    tags = {"offline_accuracy": 0.9, "onnx_sha256": "a" * 64}
    first = registry.register_candidate(c, "m", r1, artifact_path="onnx", tags=tags, decision=_decide(0.9))
    assert first["promoted"] and first["version"] == "1" and first["reused"] is False
    moves = []
    real_set_alias = c.set_registered_model_alias
    monkeypatch.setattr(c, "set_registered_model_alias", lambda *a: (moves.append(a), real_set_alias(*a)))
    again = registry.register_candidate(c, "m", r1, artifact_path="onnx", tags=tags, decision=_decide(0.9))
    assert again["version"] == "1" and again["reused"] is True and again["promoted"] is True
    assert moves == []  # champion already pointed there
    assert len(c.search_model_versions("name = 'm'")) == 1
    # another ONNX file from the same run is another candidate
    other = registry.register_candidate(c, "m", r1, artifact_path="onnx", tags={**tags, "onnx_sha256": "b" * 64},
                                        decision=_decide(0.9, {"acc": 0.9, "version": "1"}))
    assert other["version"] == "2" and other["reused"] is False


def test_retry_after_a_crash_before_the_alias_moved_completes_the_promotion(mlflow_client, tmp_path, monkeypatch):
    c = mlflow_client
    run_id = _run(c, tmp_path, 0.9)
    tags = {"offline_accuracy": 0.9, "onnx_sha256": "c" * 64}

    def crash(*_a):
        raise ConnectionError("worker lost")

    monkeypatch.setattr(c, "set_registered_model_alias", crash)
    with pytest.raises(ConnectionError):
        registry.register_candidate(c, "m", run_id, artifact_path="onnx", tags=tags, decision=_decide(0.9))
    assert registry.get_champion(c, "m") is None  # registered, not yet champion
    monkeypatch.undo()
    out = registry.register_candidate(c, "m", run_id, artifact_path="onnx", tags=tags, decision=_decide(0.9))
    assert out["reused"] and out["promoted"] and "moved now" in out["note"]
    assert registry.get_champion(c, "m")["version"] == out["version"] == "1"
    assert len(c.search_model_versions("name = 'm'")) == 1


def test_a_retried_promote_after_a_rejection_does_not_promote(mlflow_client, tmp_path):
    """A person rejected the BLESSED candidate; clearing or retrying ``promote`` resumes the
    registered version and must not move champion on the gates' decision alone."""
    c = mlflow_client
    run_id = _run(c, tmp_path, 0.9)
    tags = {"offline_accuracy": 0.9, "onnx_sha256": "d" * 64}
    first = registry.register_candidate(c, "m", run_id, artifact_path="onnx", tags=tags, decision=_decide(0.9),
                                        require_approval=True)
    assert first["awaiting_approval"] and not first["promoted"]
    registry.approve_candidate(c, "m", first["version"], approved=False, actor="carol", comment="not yet")
    again = registry.register_candidate(c, "m", run_id, artifact_path="onnx", tags=tags, decision=_decide(0.9),
                                        require_approval=True)
    assert again["reused"] and again["promoted"] is False
    assert registry.get_champion(c, "m") is None


def test_rollback_previous_twice_does_not_bring_back_the_bad_version(mlflow_client, tmp_path):
    c = mlflow_client
    for acc in (0.9, 0.91, 0.92):
        registry.register_candidate(c, "m", _run(c, tmp_path, acc), artifact_path="onnx",
                                    tags={"offline_accuracy": acc}, decision=_decide(acc))
    history = [{"action": "promoted", "champion": "1", "previous_champion": "none"},
               {"action": "promoted", "champion": "2", "previous_champion": "1"},
               {"action": "promoted", "champion": "3", "previous_champion": "2"}]
    registry.set_champion(c, "m", "3", actor="ci", reason="the history above", action="forced", expected="1")
    assert registry.get_champion(c, "m")["version"] == "3"
    assert registry.rollback_target(c, "m", history, "previous") == "2"
    registry.set_champion(c, "m", "2", actor="ops", reason="v3 is bad", action="rolled_back", expected="3")
    history.append({"action": "rolled_back", "champion": "2", "previous_champion": "3"})
    assert registry.rollback_target(c, "m", history, "previous") == "1"  # further back, never v3 again
    assert registry.rollback_target(c, "m", history, "v3") == "3"  # an explicit target is honoured


def _three_versions(c, tmp_path):
    for acc in (0.9, 0.91, 0.92):
        registry.register_candidate(c, "m", _run(c, tmp_path, acc), artifact_path="onnx",
                                    tags={"offline_accuracy": acc}, decision=_decide(acc))


def test_rollback_after_forcing_the_champion_onto_itself_still_moves(mlflow_client, tmp_path):
    """Issue 19 item 3: forcing today's champion (to redeploy it) writes a history event whose
    previous champion is the champion itself; ``previous`` must skip it, and a rollback target
    equal to the champion is refused, never a silent no-op."""
    from nightshift.errors import ConfigError

    c = mlflow_client
    _three_versions(c, tmp_path)
    registry.set_champion(c, "m", "3", actor="ci", reason="set up", action="forced", expected="1")
    history = [{"action": "promoted", "champion": "1", "previous_champion": "none"},
               {"action": "promoted", "champion": "2", "previous_champion": "1"},
               {"action": "promoted", "champion": "3", "previous_champion": "2"}]
    out = registry.set_champion(c, "m", "3", actor="ops", reason="redeploy it", action="forced", expected="3")
    assert out["moved"] is False and out["previous_champion"] == "3"
    history.append({"action": "forced", "champion": "3", "previous_champion": "3"})
    assert registry.rollback_target(c, "m", history, "previous") == "2"  # old code: "3", a no-op
    with pytest.raises(ConfigError, match=r"rollback target v3 is the current champion of m \(v3\)"):
        registry.rollback_target(c, "m", history, "v3")
    only_self = [{"action": "forced", "champion": "3", "previous_champion": "3"}]
    with pytest.raises(ConfigError, match="records no champion before v3"):
        registry.rollback_target(c, "m", only_self, "previous")


def test_set_champion_is_a_compare_and_set(mlflow_client, tmp_path):
    """Issue 19 item 4: a move decided on a champion that has moved since is refused."""
    c = mlflow_client
    _three_versions(c, tmp_path)
    assert registry.get_champion(c, "m")["version"] == "1"
    with pytest.raises(registry.ChampionMoved, match="champion of m is v1 now, not v2"):
        registry.set_champion(c, "m", "3", actor="ops", reason="stale read", action="forced", expected="2")
    assert registry.get_champion(c, "m")["version"] == "1"
    assert "nightshift.forced_by" not in c.get_model_version("m", "3").tags  # nothing written
    with pytest.raises(registry.ChampionMoved, match="not vNone"):
        registry.set_champion(c, "m", "3", actor="ops", reason="thought there was none", action="forced",
                              expected=None)
    out = registry.set_champion(c, "m", "3", actor="ops", reason="fresh read", action="forced", expected="1")
    assert out["moved"] and registry.get_champion(c, "m")["version"] == "3"
