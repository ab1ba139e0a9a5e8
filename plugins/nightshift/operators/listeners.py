"""Airflow listener: puts the run note (``nightshift.run_notes``) on every Nightshift DAG run.

Registered by the Nightshift plugin. When a ``nightly_retrain`` (or any DAG with
a ``promotion.json`` in its run folder) run ends, its DAG-run note — shown on
the run in the Airflow UI — says whether the candidate was promoted and why
not, with the numbers. A note a person wrote is never overwritten.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

from nightshift.run_notes import MARK, run_note, with_deadlines

log = logging.getLogger(__name__)


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


def missed_deadlines(dag_run: Any, session: Any) -> list[str]:
    """One line per deadline of this run that passed before it ended (Airflow's deadline rows: the
    scheduler marks them ``missed``; one the run ended after but the scheduler has not marked yet
    counts too)."""
    from datetime import datetime, timezone

    from airflow.models import Deadline
    from sqlalchemy import select

    from nightshift.contracts import deadline_miss_text

    ended = getattr(dag_run, "end_date", None) or datetime.now(timezone.utc)
    lines = []
    for d in session.scalars(select(Deadline).where(Deadline.dagrun_id == dag_run.id)):
        if d.missed or d.deadline_time < ended:
            queued = getattr(dag_run, "queued_at", None)
            interval = (d.deadline_time - queued).total_seconds() if queued else 0
            lines.append(deadline_miss_text(d.deadline_time, interval, queued))
    return lines


def _annotate(dag_run: Any) -> None:
    try:
        import threading

        from sqlalchemy.orm import object_session

        # the store the tasks wrote the run's files to: an s3:// root through the connection
        # NIGHTSHIFT_ARTIFACT_CONN_ID, as on the workers (not this scheduler's AWS_* environment)
        from nightshift.operators.base import artifact_store

        note = run_note(artifact_store(), dag_run.dag_id, dag_run.run_id)
        if object_session(dag_run) is not None:  # the scheduler: its deadline rows say what was missed
            note = with_deadlines(note, missed_deadlines(dag_run, object_session(dag_run)))
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
