"""A run waiting for approval holds back no newer run, and a newer candidate ends its
wait (issue 19 item 2), under the real scheduler and triggerer.

``airflow standalone`` (API server, scheduler with the LocalExecutor, DAG
processor, triggerer) on a temporary home runs a small DAG with the real
approval tasks of ``nightly_retrain`` (``approve_promotion`` and
``finalize_promotion``, ``max_active_runs`` as nightly_retrain's) after a
``promote`` that registers a real MLflow model version waiting for approval.
Run A waits; run B is triggered, starts at once and registers a newer
candidate; A's wait ends as ``superseded`` (champion untouched); B's request is
answered Approve through the REST API, as the UI does, and B promotes.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.airflow_stack import AirflowStack

pytestmark = [pytest.mark.integration]

DAG_ID = "approval_supersede"
MODEL = "supersede-model"

DAG_FILE = '''
from datetime import datetime

from airflow.sdk import dag, task

from nightshift.operators import FinalizePromotionOperator, PromotionApprovalOperator

MAX_ACTIVE_RUNS = {max_active_runs}  # nightly_retrain's


@dag(dag_id="{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=MAX_ACTIVE_RUNS, render_template_as_native_obj=True, default_args={{"retries": 0}},
     params={{"model_name": "{model}"}})
def approval_supersede():
    @task
    def promote(**context):
        """A candidate the gates blessed, registered waiting for approval (as promote does)."""
        import tempfile
        from pathlib import Path

        from nightshift import registry
        from nightshift.gates import Decision
        from nightshift.settings import Settings

        s = Settings.from_env()
        c = registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri)
        src = Path(tempfile.mkdtemp())
        (src / "model.onnx").write_text(context["run_id"])
        with registry.training_run(c, "supersede", context["run_id"], tags={{}}, params={{}},
                                   artifact_location=(Path(s.artifact_root) / "mlruns").as_uri()) as run_id:
            registry.log_artifacts(c, run_id, src, "onnx")
        base = registry.get_champion(c, "{model}")
        d = Decision("BLESSED", "every gate passed", base["version"] if base else None)
        out = registry.register_candidate(c, "{model}", run_id, artifact_path="onnx",
                                          tags={{"onnx_sha256": run_id}}, decision=d, require_approval=True)
        return out

    p = promote()
    approve = PromotionApprovalOperator(task_id="approve_promotion", promotion=p,
                                        model_name="{{{{ params.model_name }}}}", poke_interval=1.0,
                                        supersede_interval=2.0)
    final = FinalizePromotionOperator(task_id="finalize_promotion", promotion=p, approval=approve.output,
                                      model_name="{{{{ params.model_name }}}}")
    approve >> final


approval_supersede()
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from nightly_retrain import MAX_ACTIVE_RUNS

    home = tmp_path_factory.mktemp("supersede")
    dags = home / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(DAG_FILE.format(dag_id=DAG_ID, model=MODEL, max_active_runs=MAX_ACTIVE_RUNS))
    s = AirflowStack(home, DAG_ID, dags_folder=dags)
    try:
        s.start()
        s.unpause()
        yield s
    finally:
        s.stop()


def test_a_waiting_run_holds_back_no_newer_run_and_is_superseded_by_it(stack):
    from nightshift import contracts, registry, state

    run_a = stack.trigger()
    stack.wait_for("run A's approve_promotion to wait (deferred on the supersedable trigger)",
                   lambda: stack.state(run_a, "approve_promotion") == "deferred")
    # a newer run starts and registers its candidate while A still waits
    run_b = stack.trigger()
    stack.wait_for("run B's promote", lambda: stack.state(run_b, "promote") == "success")
    b_promoted_at = stack.tis(run_b)["promote"]["end_date"]
    # A's wait ends: superseded by B's candidate, recorded, nothing promoted
    stack.wait_for("run A to end", lambda: stack.state(run_a, "finalize_promotion") in ("success", "failed"))
    a = stack.tis(run_a)
    assert a["approve_promotion"]["state"] == "success" and a["finalize_promotion"]["state"] == "success", a
    assert a["approve_promotion"]["end_date"] > b_promoted_at  # A still waited when B had promoted

    c = registry.client(stack.env["MLFLOW_TRACKING_URI"])
    history = list(state.read_jsonl(contracts.history_path(stack.env["NIGHTSHIFT_ARTIFACT_ROOT"], MODEL)))
    (superseded,) = history
    assert superseded["action"] == "superseded" and superseded["run_id"] == run_a
    version_a, version_b = superseded["version"], superseded["extra"]["superseded_by"]
    assert int(version_b) > int(version_a)
    assert registry.get_champion(c, MODEL) is None
    tags = c.get_model_version(MODEL, version_a).tags
    assert tags["nightshift.approval"] == "superseded" and tags["nightshift.superseded_by"] == version_b
    # A's request is closed in Airflow, saying why (the Required Actions page no longer offers it)
    r = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_a}/taskInstances/approve_promotion/-1/hitlDetails")
    assert r.status_code == 200, r.text
    detail = r.json()
    assert detail["response_received"] and detail["chosen_options"] == ["Reject"]
    assert f"superseded by the newer candidate v{version_b}" in json.dumps(detail["params_input"])

    # B waits for its own answer; a person approves it through the REST API, as the UI does
    stack.wait_for("run B's approve_promotion to wait", lambda: stack.state(run_b, "approve_promotion") == "deferred")
    r = stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_b}/taskInstances/approve_promotion/-1/hitlDetails",
                  json={"chosen_options": ["Approve"], "params_input": {"comment": "newest one, ship it"}})
    assert r.status_code == 200, r.text
    stack.wait_for("run B to end", lambda: stack.state(run_b, "finalize_promotion") in ("success", "failed"))
    assert stack.state(run_b, "finalize_promotion") == "success", stack.logs()
    assert registry.get_champion(c, MODEL)["version"] == version_b
    history = list(state.read_jsonl(contracts.history_path(stack.env["NIGHTSHIFT_ARTIFACT_ROOT"], MODEL)))
    assert [e["action"] for e in history] == ["superseded", "promoted"] and history[-1]["run_id"] == run_b
