"""Airflow listener: a run note that says what a Nightshift run decided.

Registered by the Nightshift plugin. When a ``nightly_retrain`` (or any DAG with
a ``promotion.json`` in its run folder) run ends, its DAG-run note — shown on
the run in the Airflow UI — says whether the candidate was promoted and why
not, with the numbers. A note a person wrote is never overwritten.

The scheduler that runs this listener shares no folder with the workers when the
artifact root is ``s3://``: ``promotion.json`` is read through the artifact store.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)
MARK = "[nightshift] "


def run_note(artifact_root: Any, dag_id: str, run_id: str) -> str | None:
    """The note for one run, from its ``promotion.json`` in the artifact store (or a local root
    folder); None when there is none or it is not JSON.

    :raises StoreError: the store cannot be reached (the caller logs it; no note is written).
    """
    from nightshift.artifacts import run_path
    from nightshift.contracts import as_store
    from nightshift.store import StoreError

    rel = (run_path("", dag_id, run_id) / "promotion.json").as_posix()
    try:
        p = as_store(artifact_root).read_json(rel)
    except StoreError as exc:
        if exc.retryable:
            raise
        log.warning("no Nightshift note for %s %s: %s", dag_id, run_id, exc)
        return None
    if not isinstance(p, dict):
        return None
    model, version = p.get("model_name"), p.get("version")
    if p.get("promoted"):
        head = f"PROMOTED {model} v{version} to champion (was {('v' + str(p['previous_champion'])) if p.get('previous_champion') else 'none'})"
    elif p.get("awaiting_approval"):
        head = f"BLESSED {model} v{version}: waiting for approval (task approve_promotion)"
    else:
        head = f"NOT PROMOTED {model} v{version}; champion stays {('v' + str(p['champion'])) if p.get('champion') else 'none'}"
    failed = [g for g in p.get("gates", []) if not g.get("passed")]
    lines = [MARK + head, "", str(p.get("reason", ""))]
    if p.get("approved_by"):  # a person answered approve_promotion: say who and what
        lines += ["", f"{'Approved' if p.get('approved') else 'Rejected'} by {p['approved_by']}"
                      + (f": {p['approval_comment']}" if p.get("approval_comment") else "")]
    if p.get("approval") in ("superseded", "stale", "undeployable") and p.get("note"):
        lines += ["", str(p["note"])]  # the wait ended and champion did not move: say why
    if p.get("loosened_thresholds"):  # also after the answer: what the person approved or rejected
        lines += ["", "Approval needed: this run loosened the gate file:" if p.get("awaiting_approval")
                  else "This run loosened the gate file:", *[f"- {why}" for why in p["loosened_thresholds"]]]
    if p.get("data_changed"):
        lines += ["", "Approval needed: this run's data differs from the champion's:" if p.get("awaiting_approval")
                  else "This run's data differs from the champion's:", *[f"- {why}" for why in p["data_changed"]]]
    if failed:
        lines += ["", *[f"- {g['name']}: {g.get('detail', '')}" for g in failed]]
    evidence = _evidence_line(p.get("evidence") or {})  # last: the note is cut at 1,000 characters
    if evidence:
        lines += ["", evidence]
    return "\n".join(lines)[:1000]


def _evidence_line(ev: dict) -> str:
    """One line on how much the accuracies are worth: n, 95% intervals, the paired comparison."""
    if not ev.get("test_images"):
        return ""
    parts = [f"Evidence: {ev['test_images']} test images (min {ev.get('min_test_images')})"]
    for name, a in (ev.get("accuracies") or {}).items():
        ci = a.get("ci95") or []
        if a.get("value") is not None and len(ci) == 2:
            parts.append(f"{name} {float(a['value']):.4f} (95% CI {float(ci[0]):.3f}-{float(ci[1]):.3f})")
    paired = ev.get("paired") or {}
    if paired.get("mcnemar_p") is not None:
        parts.append(f"paired vs champion: {paired.get('champion_only_correct')} images only the champion got "
                     f"right, {paired.get('candidate_only_correct')} only the candidate, McNemar p="
                     f"{float(paired['mcnemar_p']):.3g}")
    return "; ".join(parts)


def _set_note(dag_id: str, run_id: str, note: str, *, attempts: int = 20, wait_s: float = 0.5) -> bool:
    """Write the note in a session of its own, once the run's own transaction is
    committed (SQLite allows one writer); a person's note is never replaced."""
    import time

    from airflow.models import DagRun
    from airflow.utils.session import create_session

    for _ in range(attempts):
        time.sleep(wait_s)
        try:
            with create_session() as session:
                dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
                if dr is None:
                    continue
                current = dr.note
                if current and not str(current).startswith(MARK):
                    return False
                dr.note = note
            return True
        except Exception as exc:  # noqa: BLE001 - e.g. "database is locked": try again
            log.debug("note on %s %s not written yet: %s", dag_id, run_id, exc)
    log.warning("could not write the Nightshift note on %s %s", dag_id, run_id)
    return False


def _annotate(dag_run: Any) -> None:
    try:
        import threading

        from sqlalchemy.orm import object_session

        from nightshift.settings import Settings

        note = run_note(Settings.from_env().store(), dag_run.dag_id, dag_run.run_id)
        if note is None:
            return
        if object_session(dag_run) is not None:  # the scheduler's own session: write with it
            current = dag_run.note
            if not current or str(current).startswith(MARK):
                dag_run.note = note
            return
        # A detached run (dag.test): write after its transaction commits, without blocking it.
        threading.Thread(target=_set_note, args=(dag_run.dag_id, dag_run.run_id, note),
                         name="nightshift-run-note", daemon=True).start()
    except Exception:  # noqa: BLE001 - a note must never break the scheduler
        log.exception("could not write the Nightshift note on %s %s", dag_run.dag_id, dag_run.run_id)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _annotate(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _annotate(dag_run)
