"""SetChampionOperator (nightshift.operators.champion): a forced promotion and a rollback record who
did it and why."""

from __future__ import annotations

import os

import pytest
from airflow.sdk.exceptions import AirflowFailException

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_promote_model_and_rollback_record_who_and_why(ctx, tmp_path):
    from types import SimpleNamespace

    from nightshift import contracts, registry, state
    from nightshift.gates import Decision
    from nightshift.operators import SetChampionOperator

    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
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
        state.append_history(os.environ['NIGHTSHIFT_HOME'] + "/artifacts", contracts.HistoryEvent(
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
    events = list(state.read_jsonl(contracts.history_path(os.environ['NIGHTSHIFT_HOME'] + "/artifacts", "m")))
    assert [e["action"] for e in events][-2:] == ["rolled_back", "forced"]
    with pytest.raises(Exception, match="no version 9"):
        SetChampionOperator(task_id="p", model_name="m", version="9", reason="x", action="forced").execute(ctx)
