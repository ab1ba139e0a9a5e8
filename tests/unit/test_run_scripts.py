"""`make run`'s terminal: a run that waits for a person says so, where and how to
answer, at once and again while it waits (issue 19, item 12); the summary names
the waiting run; ``scripts/approve.py`` answers through Airflow's HITL REST API."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RUN = "manual__2026-12-04T15:01:33.159636+00:00"
TI = "01a24193-2986-7493-9c6a-1e93bc1e0bb0"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"nightshift_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


progress, summary, approve = _script("progress"), _script("summary"), _script("approve")

# lines as `airflow dags test` (Airflow 3.3) writes them for a HITL task that parks, then resumes
Z = "2026-12-04T15:01:36.9Z [info     ] "
PARK = [
    f"{Z}[DAG TEST] starting task_id=approve_promotion map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501",
    f"{Z}[DAG TEST] running task <TaskInstance: nightly_retrain.approve_promotion {RUN} [TaskInstanceState.SCHEDULED] "
    f"ti_id={TI}> [airflow.sdk.definitions.dag] loc=dag.py:1504",
    f"{Z}Waiting for response           [airflow.task.operators.airflow.providers.standard.operators.hitl] loc=hitl.py:230",
    f"{Z}Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] correlation_id=x "
    f"loc=task_instances.py:485 new_state=awaiting_input rows_affected=1 ti_id={TI}",
    f"{Z}[DAG TEST] end task task_id=approve_promotion map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563",
]
WAIT = (f"{Z}Waiting for Human-in-the-loop input for tasks: ['approve_promotion'] "
        "[airflow.sdk.definitions.dag] loc=dag.py:1418")
RESUME = (f"{Z}[DAG TEST] running task <TaskInstance: nightly_retrain.approve_promotion {RUN} [scheduled] "
          f"ti_id={TI}> [airflow.sdk.definitions.dag] loc=dag.py:1504")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_required_actions_url_is_the_route_airflow_links_to():
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    ti = type("TI", (), {"dag_id": "nightly_retrain", "run_id": RUN, "task_id": "approve_promotion", "map_index": -1})()
    theirs = ApprovalOperator(task_id="approve_promotion", subject="s").generate_link_to_ui(
        task_instance=ti, base_url="http://127.0.0.1:8080")
    ours = approve.required_actions_url("nightly_retrain", RUN, base="http://127.0.0.1:8080")
    assert unquote(ours) == theirs.split("?")[0]
    assert "+" not in ours and ":" not in ours.split("//", 1)[1].split("/", 1)[1]  # run id encoded in the path


def test_progress_says_at_once_that_a_person_must_answer_and_keeps_saying_it():
    clock, out = Clock(), io.StringIO()
    p = progress.Progress(clock=clock, out=out, hint_every_s=45)
    for line in PARK:
        p.line(line)
    assert "WAITING FOR A PERSON" not in out.getvalue()
    p.line(WAIT)
    first = out.getvalue()
    url = approve.required_actions_url("nightly_retrain", RUN)
    assert "WAITING FOR A PERSON" in first and url in first
    assert "/tasks/approve_promotion/required_actions" in url
    assert approve.answer_command(RUN, "approve") in first and approve.answer_command(RUN, "reject") in first
    assert f"python scripts/approve.py {RUN} approve --comment" in first
    assert "make airflow-ui" in first
    # dag.test() logs WAIT every second: no new hint before hint_every_s ...
    for _ in range(40):
        clock.t += 1
        p.line(WAIT)
    assert out.getvalue().count("WAITING FOR A PERSON") == 1
    # ... then again, also when the log is quiet (tick), with how long it has waited
    clock.t += 5
    p.line(WAIT)
    assert out.getvalue().count("still WAITING FOR A PERSON") == 1
    clock.t += 45
    p.tick()
    assert out.getvalue().count("still WAITING FOR A PERSON") == 2 and "(1 min 30 s)" in out.getvalue()
    # answered: the task runs again, the reminders stop
    p.line(RESUME)
    assert "wait over" in out.getvalue().splitlines()[-2]
    before = out.getvalue()
    clock.t += 300
    p.tick()
    assert out.getvalue() == before


def test_progress_hints_for_an_approval_that_waits_on_a_trigger():
    """The same when approve_promotion defers to a trigger (run in line by dag.test(), which
    then logs nothing while it waits) instead of parking in awaiting_input."""
    clock, out = Clock(), io.StringIO()
    p = progress.Progress(clock=clock, out=out, hint_every_s=45)
    for line in (*PARK[:3],
                 f"{Z}Task instance state updated    [x] loc=task_instances.py:485 new_state=deferred rows_affected=1 "
                 f"ti_id={TI}",
                 f"{Z}[DAG TEST] running trigger in line [airflow.sdk.definitions.dag] loc=dag.py:1534",
                 f"{Z}Waiting for Human-in-the-loop input for tasks: ['approve_promotion'] (nightly_retrain {RUN}: "
                 "m v3; the wait ends early when a newer candidate of m is registered) [nightshift.operators]"):
        p.line(line)
    assert "DEFERRED" in out.getvalue() and "WAITING FOR A PERSON" in out.getvalue()
    assert approve.required_actions_url("nightly_retrain", RUN) in out.getvalue()
    for _ in range(3):  # the log is quiet: follow() ticks
        clock.t += 45
        p.tick()
    assert out.getvalue().count("still WAITING FOR A PERSON") == 3


def test_progress_follows_a_log_file_to_the_end(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([*PARK, WAIT, WAIT]) + "\n")
    out = io.StringIO()
    progress.follow(str(log), 2 ** 22 + 7, progress.Progress(out=out))  # no such pid: read to the end and stop
    assert "approve_promotion" in out.getvalue() and "WAITING FOR A PERSON" in out.getvalue()


def test_summary_names_the_run_that_waits_for_a_person(tmp_path):
    from nightshift.artifacts import atomic_write_json, run_dir

    folder = run_dir(tmp_path, "nightly_retrain", RUN)
    atomic_write_json(folder / "promotion.json", {
        "promoted": False, "awaiting_approval": True, "model_name": "m", "version": "3", "champion": "2",
        "previous_champion": "2", "reason": "blessed; approval needed", "image": "img", "offline_accuracy": 0.9,
        "served_accuracy": 0.9, "p95_latency_ms": 3.0, "gates": [{"name": "min_accuracy", "passed": True,
                                                                  "detail": "0.9 >= 0.1"}]})
    latest = {"run_id": RUN, "state": "running",
              "tasks": {"promote": "success", "approve_promotion": "awaiting_input"}}
    waiting = [{"run_id": RUN, "task_id": "approve_promotion", "since": "2026-12-04 15:01 UTC"}]
    out = io.StringIO()
    rc = summary.summarize("nightly_retrain", latest, waiting, tmp_path, out)
    text = out.getvalue()
    assert rc == 1
    assert "BLESSED, WAITING FOR APPROVAL: m v3" in text and "NOT PROMOTED" not in text
    assert f"run {RUN}: task approve_promotion awaits approval" in text
    assert approve.required_actions_url("nightly_retrain", RUN) in text
    assert f"python scripts/approve.py {RUN} approve" in text
    # an older run still waiting is named too, beside a newer run that finished
    out = io.StringIO()
    summary.summarize("nightly_retrain", {"run_id": "manual__later", "state": "success", "tasks": {}}, waiting,
                      tmp_path, out)
    assert f"run {RUN}: task approve_promotion awaits approval" in out.getvalue()
    quiet = io.StringIO()
    assert summary.summarize("nightly_retrain", {"run_id": "r", "state": "success", "tasks": {}}, [], tmp_path,
                             quiet) == 0
    assert "WAITING" not in quiet.getvalue()


def test_summary_says_where_the_champion_serves(tmp_path):
    from nightshift.artifacts import atomic_write_json, run_dir
    from nightshift.state import write_deployment

    atomic_write_json(run_dir(tmp_path, "nightly_retrain", RUN) / "promotion.json", {
        "promoted": True, "model_name": "m", "version": "3", "champion": "3", "reason": "all gates passed",
        "image": "img", "gates": []})
    latest = {"run_id": RUN, "state": "success", "tasks": {"deploy": "success"}}
    out = io.StringIO()
    summary.summarize("nightly_retrain", latest, [], tmp_path, out)
    assert "serving:  nothing (not deployed)" in out.getvalue()
    write_deployment(tmp_path, "m", {"registry_version": "3", "url": "http://127.0.0.1:8600",
                                     "grpc_target": "127.0.0.1:8601"})
    out = io.StringIO()
    summary.summarize("nightly_retrain", latest, [], tmp_path, out)
    assert "serving:  v3 on http://127.0.0.1:8600, gRPC 127.0.0.1:8601" in out.getvalue()


def _api(handler):
    import httpx

    calls = []

    def record(request):
        calls.append(request)
        return handler(request)

    return httpx.MockTransport(record), calls


def test_approve_answers_through_the_hitl_rest_api(monkeypatch):
    import httpx

    monkeypatch.delenv("AIRFLOW_API_TOKEN", raising=False)
    monkeypatch.delenv("AIRFLOW_USERNAME", raising=False)
    path = (f"/api/v2/dags/nightly_retrain/dagRuns/{RUN.replace(':', '%3A').replace('+', '%2B')}"
            "/taskInstances/approve_promotion/-1/hitlDetails")

    def handler(request):
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": "tok"})
        assert request.headers["authorization"] == "Bearer tok"
        assert request.url.raw_path.decode() == path
        if request.method == "GET":
            return httpx.Response(200, json={"response_received": False, "options": ["Approve", "Reject"],
                                             "params": {"comment": {"value": "", "schema": {}, "description": None}}})
        body = json.loads(request.content)
        return httpx.Response(200, json={"chosen_options": body["chosen_options"], "params_input": body["params_input"],
                                         "responded_by": {"id": "u", "name": "ann"}})

    transport, calls = _api(handler)
    res = approve.answer(RUN, "reject", comment="too few images", url="http://af", transport=transport)
    assert res["chosen_options"] == ["Reject"]
    patch = [c for c in calls if c.method == "PATCH"]
    assert len(patch) == 1 and json.loads(patch[0].content) == {"chosen_options": ["Reject"],
                                                                "params_input": {"comment": "too few images"}}


def test_approve_refuses_a_request_already_answered_and_says_when_no_server(monkeypatch):
    import httpx

    monkeypatch.setenv("AIRFLOW_API_TOKEN", "t")
    transport, calls = _api(lambda r: httpx.Response(200, json={
        "response_received": True, "chosen_options": ["Approve"], "responded_by_user": {"name": "bob"}}))
    with pytest.raises(PermissionError, match="already answered.*bob"):
        approve.answer(RUN, "approve", url="http://af", transport=transport)
    assert not [c for c in calls if c.method == "PATCH"]

    def down(request):
        raise httpx.ConnectError("refused", request=request)

    transport, _ = _api(down)
    with pytest.raises(ConnectionError, match="make airflow-ui"):
        approve.answer(RUN, "approve", url="http://127.0.0.1:9", transport=transport)
