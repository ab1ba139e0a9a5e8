"""Print the outcome of the latest run of a Nightshift DAG: task states, the
promotion decision and its gates, champion version, image, key metrics and
where the reports are; and every run of the DAG whose approval
(``approve_promotion``) still waits for a person, with where and how to answer.
Exit status 1 when the run did not succeed (a run waiting for a person has not)."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from approve import airflow_url, answer_command, required_actions_url  # noqa: E402 - the sibling script


def _load(dag_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The latest run (``run_id``, ``state``, ``tasks``: task -> state) and every task
    instance of the DAG that awaits a person (``run_id``, ``task_id``, ``since``)."""
    from airflow.models import DagRun, TaskInstance
    from airflow.models.hitl import HITLDetail
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        latest = None
        if run is not None:
            tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id,
                                                     TaskInstance.run_id == run.run_id).all()
            latest = {"run_id": run.run_id, "state": str(run.state),
                      "tasks": {ti.task_id: str(ti.state) for ti in tis}}
        # parked (Airflow 3.3's awaiting_input) or deferred on a trigger, with a request nobody answered
        parked = (session.query(TaskInstance).join(HITLDetail, HITLDetail.ti_id == TaskInstance.id)
                  .filter(TaskInstance.dag_id == dag_id,
                          TaskInstance.state.in_([TaskInstanceState.AWAITING_INPUT, TaskInstanceState.DEFERRED]),
                          HITLDetail.responded_at.is_(None)).all())
        waiting = [{"run_id": ti.run_id, "task_id": ti.task_id,
                    "since": ti.start_date.strftime("%Y-%m-%d %H:%M UTC") if ti.start_date else None}
                   for ti in sorted(parked, key=lambda t: (t.start_date is None, t.start_date))]
    return latest, waiting


def waiting_lines(dag_id: str, waiting: list[dict[str, Any]]) -> list[str]:
    """What to tell a person about runs that wait for them."""
    if not waiting:
        return []
    out = [f"\nWAITING FOR A PERSON: {len(waiting)} run(s) of {dag_id} wait for an answer "
           "(`airflow dags test` does not drive them once it has stopped):"]
    for w in waiting:
        out += [f"  run {w['run_id']}: task {w['task_id']} awaits approval"
                + (f" since {w['since']}" if w.get("since") else ""),
                f"    answer in the Airflow UI (`make airflow-ui`): "
                f"{required_actions_url(dag_id, w['run_id'], w['task_id'])}",
                f"    or from a shell, with `make airflow-ui` running: {answer_command(w['run_id'], 'approve', dag_id)}"
                f"  (or reject)"]
    out.append(f"  Once answered, a scheduler finishes the run: unpause {dag_id} in `make airflow-ui` "
               "(which also starts its schedule).")
    return out


def summarize(dag_id: str, latest: dict[str, Any] | None, waiting: list[dict[str, Any]],
              artifact_root: Any, out: TextIO | None = None) -> int:
    """:param artifact_root: the artifact store (``Settings.store()``) or a local root folder: the
    run's reports are read through it (with an ``s3://`` root, not from this machine's disk)."""
    from nightshift.artifacts import run_path
    from nightshift.store import as_store

    out = out or sys.stdout
    store = as_store(artifact_root)

    def say(text: str = "") -> None:
        print(text, file=out)

    if latest is None:
        say(f"no run of {dag_id} found")
        return 1
    run_id, run_state = latest["run_id"], latest["state"]
    rel = run_path("", dag_id, run_id).as_posix()
    folder = store.to_uri(store.local_root / rel)  # where the reports are, for people (URI or path)
    say(f"\n=== {dag_id} {run_id}: {run_state.upper()}")
    for task, state in sorted(latest["tasks"].items()):
        say(f"  {task:<24} {state}")
    validation = store.read_json(f"{rel}/validation/validation.json")
    if validation is not None:
        v = validation["summary"]
        if not v.get("success", True):
            say(f"\nDATA VALIDATION FAILED ({v.get('failed')} of {v.get('evaluated')} expectations); nothing was trained:")
            for f in v.get("failures", []):
                say(f"  - {f.get('expectation')}{' [' + f['column'] + ']' if f.get('column') else ''}: {f.get('summary')}")
    p = store.read_json(f"{rel}/promotion.json")
    if p is not None:
        head = ("PROMOTED" if p.get("promoted") else
                "BLESSED, WAITING FOR APPROVAL" if p.get("awaiting_approval") else "NOT PROMOTED")
        say(f"\n{head}: {p.get('model_name')} v{p.get('version')} — {p.get('reason')}")
        say(f"  champion: v{p.get('champion')} (before this run: {p.get('previous_champion') or 'none'})")
        say(f"  image:    {p.get('image')}")
        serving = _serving_line(store, p.get("model_name"))
        if serving:
            say(serving)
        say(f"  offline accuracy {_f(p.get('offline_accuracy'))}, served accuracy {_f(p.get('served_accuracy'))}, "
            f"p95 latency {_f(p.get('p95_latency_ms'), 2)} ms")
        for g in p.get("gates", []):
            say(f"    {'PASS' if g.get('passed') else 'FAIL'}  {g.get('name', ''):<18} {g.get('detail', '')}")
        d = p.get("drift") or {}
        say(f"  drift: {d.get('status')}, drifted share {d.get('drifted_share')}, report {d.get('report_html')}")
    for line in waiting_lines(dag_id, waiting):
        say(line)
    for name in ("validation/validation.json", "system_eval/system_eval.json", "model/parity.json", "promotion.json"):
        if store.exists(f"{rel}/{name}"):
            say(f"  report: {folder}/{name}")
    say(f"  artifacts: {folder}")
    say(f"  Nightshift view: `make airflow-ui`, then Browse → Nightshift ({airflow_url()}/nightshift/)")
    return 0 if run_state == "success" else 1


def _serving_line(store: Any, model_name: Any) -> str | None:
    """Where the model serves now (the deployment state), for the person who just ran it."""
    from nightshift.state import read_deployment
    from nightshift.store import StoreError

    if not model_name:
        return None
    try:
        d = read_deployment(store, str(model_name))
    except StoreError as exc:
        return f"  serving:  unknown (the deployment state cannot be read: {exc})"
    if not d:
        return "  serving:  nothing (not deployed)"
    grpc = f", gRPC {d['grpc_target']}" if d.get("grpc_target") else ""
    return f"  serving:  v{d.get('registry_version')} on {d.get('url')}{grpc} (`make stop-serving` stops it)"


def _f(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def main(dag_id: str) -> int:
    from nightshift.settings import Settings

    latest, waiting = _load(dag_id)
    return summarize(dag_id, latest, waiting, Settings.from_env().store())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "nightly_retrain"))
