"""A forced deadline miss under the real scheduler: Airflow's Deadline Alerts are checked by the
scheduler, and the callback runs on the executor, so ``dag.test()`` cannot show them.

A models file with a second model whose nightly run has a 1 s deadline; its run is triggered
through the REST API. The scheduler finds the deadline passed, the LocalExecutor runs
``record_deadline_miss``, and the miss is in the model's record in the artifact store (what the
Nightshift view lists). The run is then marked failed (nothing else of it matters here): the
listener's run note starts with the miss. A small Dag with the same kind of deadline (an hour)
that succeeds at once shows the other side: the scheduler drops a deadline that was met, and
nothing is recorded.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.airflow_stack import ROOT, AirflowStack

pytestmark = [pytest.mark.integration]

MODEL = "late-digits"
DAG_ID = f"nightly_retrain__{MODEL}"
PROBE = '''
from datetime import datetime

from airflow.sdk import task

from nightshift.operators.deadline import DeadlineDAG, nightly_deadline

with DeadlineDAG(dag_id="deadline_met", schedule=None, start_date=datetime(2026, 1, 1), tags=["test"],
                 deadline=nightly_deadline("met-model", 3600)):
    @task
    def quick() -> int:
        return 1

    quick()

with DeadlineDAG(dag_id="deadline_cleared", schedule=None, start_date=datetime(2026, 1, 1), tags=["test"],
                 deadline=nightly_deadline("cleared-model", 3600)):
    @task(retries=0)
    def fails() -> int:
        raise RuntimeError("fails on purpose: its run keeps a pending deadline")

    fails()
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("deadline")
    models = home / "models.yaml"
    models.write_text("models:\n"
                      "  - {name: nightshift-digits, default: true}\n"
                      f"  - {{name: {MODEL}, deadline: 1s, deploy: {{target: none}}, recipe: {{epochs: 1}}}}\n")
    dags = home / "dags"  # the project's Dag files and a small Dag that meets its deadline
    dags.mkdir()
    for f in (ROOT / "dags").glob("*.py"):
        (dags / f.name).write_text(f.read_text())
    (dags / "deadline_met.py").write_text(PROBE)
    s = AirflowStack(home, DAG_ID, dags_folder=dags, NIGHTSHIFT_MODELS_FILE=str(models))
    try:
        s.start()
        s.load_pools()
        yield s
    finally:
        s.stop()


def _misses(stack):
    f = stack.home / "artifacts" / "deadlines" / MODEL / "misses.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def test_a_forced_deadline_miss_is_recorded_shown_and_written_in_the_run_note(stack):
    from nightshift import model_config, registry
    from nightshift.ui import data

    stack.unpause()
    t0 = time.monotonic()
    run_id = stack.trigger({})
    misses = stack.wait_for("the deadline callback's record", lambda: [m for m in _misses(stack)
                                                                         if m["run_id"] == run_id], timeout=240)
    print(f"deadline miss recorded {time.monotonic() - t0:.0f}s after the trigger")
    (miss,) = misses
    assert miss["model"] == MODEL and miss["dag_id"] == DAG_ID and miss["interval_s"] == 1.0
    assert miss["key"] == f"{DAG_ID}/{run_id}" and miss["deadline_time"] and miss["queued_at"]

    overview = data.build_overview(stack.home / "artifacts", registry.client(f"sqlite:///{stack.home / 'mlflow.db'}"),
                                   configured=model_config.load_models(stack.home / "models.yaml"))
    shown = {m["name"]: m for m in overview["models"]}
    assert [d["run_id"] for d in shown[MODEL]["deadline_misses"]] == [run_id]
    assert shown["nightshift-digits"]["deadline_misses"] == []  # one model's miss is that model's only

    r = stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
    assert r.status_code == 200, r.text
    note = stack.wait_for("the run note", lambda: stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
                          .get("note"), timeout=60)
    assert note.startswith("[nightshift] DEADLINE MISSED: not done by "), note
    assert "(1s after it was queued at " in note, note


def test_a_deadline_that_is_met_records_nothing(stack):
    stack.wait_for("deadline_met to be parsed", lambda: stack.api("GET", "/dags/deadline_met").status_code == 200)
    r = stack.api("PATCH", "/dags/deadline_met", json={"is_paused": False})
    assert r.status_code == 200, r.text
    r = stack.api("POST", "/dags/deadline_met/dagRuns", json={"logical_date": None, "conf": {}})
    assert r.status_code in (200, 201), r.text
    run_id = r.json()["dag_run_id"]
    state = stack.wait_for("deadline_met to end", lambda: (stack.api("GET", f"/dags/deadline_met/dagRuns/{run_id}")
                                                            .json().get("state") in ("success", "failed")) and
                           stack.api("GET", f"/dags/deadline_met/dagRuns/{run_id}").json()["state"], timeout=180)
    assert state == "success", stack.logs()
    f = stack.home / "artifacts" / "deadlines" / "met-model" / "misses.jsonl"
    assert not f.exists(), f.read_text()


def test_a_task_of_a_run_with_a_pending_deadline_can_be_cleared(stack):
    """Clearing recalculates the run's queued-at deadlines; on Airflow 3.3.2 that answered 500
    (the stored interval is encoded) until the plugin's fix: the task is cleared and runs again."""
    dag = "deadline_cleared"
    stack.wait_for(f"{dag} to be parsed", lambda: stack.api("GET", f"/dags/{dag}").status_code == 200)
    assert stack.api("PATCH", f"/dags/{dag}", json={"is_paused": False}).status_code == 200
    r = stack.api("POST", f"/dags/{dag}/dagRuns", json={"logical_date": None, "conf": {}})
    assert r.status_code in (200, 201), r.text
    run_id = r.json()["dag_run_id"]

    def run_state():
        return stack.api("GET", f"/dags/{dag}/dagRuns/{run_id}").json().get("state")

    assert stack.wait_for(f"{dag} to fail", lambda: run_state() in ("success", "failed") and run_state(),
                          timeout=180) == "failed"
    r = stack.api("POST", f"/dags/{dag}/clearTaskInstances",
                  json={"dag_run_id": run_id, "task_ids": ["fails"], "dry_run": False, "only_failed": True})
    assert r.status_code == 200, r.text  # 500 before the fix: "unsupported type for timedelta seconds component"
    assert [t["task_id"] for t in r.json()["task_instances"]] == ["fails"]
    tries = stack.wait_for("the cleared task to run again", lambda: (
        t := stack.api("GET", f"/dags/{dag}/dagRuns/{run_id}/taskInstances/fails").json()).get("try_number", 0) >= 2
        and t.get("state") == "failed" and t["try_number"], timeout=180)
    assert tries == 2

