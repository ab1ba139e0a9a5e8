"""The nightly run's deadline (Airflow 3 Deadline Alerts) and what a miss does.

Each model's ``nightly_retrain`` DAG carries ``deadline=nightly_deadline(...)``: the run must be
done ``interval`` after it was queued (``DeadlineReference.DAGRUN_QUEUED_AT``). The scheduler
checks deadlines in its loop; for a run that is not done by then it queues
:func:`record_deadline_miss` on the executor (a ``SyncCallback``), which records the miss through
the artifact store (:func:`nightshift.state.record_deadline_miss`), where the Nightshift view
reads it. The run note says it too (:mod:`nightshift.operators.listeners`, from the scheduler's own deadline
rows when the run ends). ``dag.test()`` runs no scheduler: no deadline is checked there.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG

log = logging.getLogger(__name__)


class DeadlineDAG(DAG):
    """A Dag with a Deadline Alert that ``dag.test()`` (and ``airflow dags test``, ``make run``)
    can run: Airflow 3.3.2's ``dag.test()`` builds its scheduler Dag from a fresh serialization,
    whose ``deadline`` holds the encoded alerts where the end of a successful run looks up alert
    ids in the database (``AttributeError: 'dict' object has no attribute 'hex'`` after every
    task succeeded). ``dag.test()`` runs no scheduler, so no deadline would be checked anyway:
    the test run goes without it (no deadline rows are created for it), and the Dag keeps it."""

    def test(self, *args: Any, **kwargs: Any) -> Any:
        saved = self.deadline
        self.deadline = None
        try:
            return super().test(*args, **kwargs)
        finally:
            self.deadline = saved


def interval_seconds(interval: Any) -> float:
    """A deadline alert's stored interval in seconds: the metadata database keeps it encoded
    (``{"__data__": seconds, ...}``), older rows and the SDK a number or a ``timedelta``."""
    if isinstance(interval, dict):
        interval = interval.get("__data__")
    if isinstance(interval, timedelta):
        return interval.total_seconds()
    return float(interval)


def fix_clearing_runs_with_a_deadline() -> bool:
    """Make clearing a task work for runs with a ``DAGRUN_QUEUED_AT`` deadline (every nightly run).

    Airflow 3.3.2's ``clear_task_instances`` moves each such deadline with the run's new
    ``queued_at``, and reads the alert's interval as a number of seconds while the database
    holds it encoded (a dict): ``TypeError: unsupported type for timedelta seconds component:
    dict``, i.e. every "Clear" of a task of a nightly run -- the UI, the REST API -- answered 500.
    This replaces that private helper with the same logic reading the interval as Airflow's own
    ``DeadlineAlert`` model does. Installed by the Nightshift plugin (the API server clears);
    a no-op once installed, or when Airflow has no such helper (fixed or renamed upstream).

    :returns: whether the fix was installed now.
    """
    from airflow.models import taskinstance as ti_module

    original = getattr(ti_module, "_recalculate_dagrun_queued_at_deadlines", None)
    if original is None or getattr(original, "nightshift_fixed", False):
        return False

    def recalculate(dagrun: Any, new_queued_at: Any, session: Any) -> None:
        from sqlalchemy import false, select

        from airflow.models.deadline import Deadline, ReferenceModels
        from airflow.models.deadline_alert import DeadlineAlert as DeadlineAlertModel

        rows = session.execute(
            select(Deadline, DeadlineAlertModel)
            .join(DeadlineAlertModel, Deadline.deadline_alert_id == DeadlineAlertModel.id)
            .where(Deadline.dagrun_id == dagrun.id, Deadline.missed == false(),
                   DeadlineAlertModel.reference[ReferenceModels.REFERENCE_TYPE_FIELD].as_string()
                   == ReferenceModels.DagRunQueuedAtDeadline.__name__)
        ).all()
        for deadline, alert in rows:  # flushed with the caller's transaction, as upstream
            deadline.deadline_time = new_queued_at + timedelta(seconds=interval_seconds(alert.interval))

    recalculate.nightshift_fixed = True  # type: ignore[attr-defined]
    recalculate.__wrapped__ = original  # type: ignore[attr-defined]
    ti_module._recalculate_dagrun_queued_at_deadlines = recalculate
    log.info("installed Nightshift's fix for clearing tasks of runs with a queued-at deadline (Airflow 3.3.2)")
    return True


def nightly_deadline(model_name: str, interval_s: float) -> Any:
    """The ``DeadlineAlert`` of one model's nightly run: done ``interval_s`` after it was queued."""
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(seconds=interval_s),
        callback=SyncCallback(record_deadline_miss, kwargs={"model_name": model_name, "interval_s": interval_s}),
        name=f"nightshift-deadline-{model_name}",
    )


def record_deadline_miss(context: dict[str, Any], model_name: str, interval_s: float) -> bool:
    """The deadline callback: record that the run in ``context`` missed its deadline (once per run).

    ``context`` is what the scheduler hands a deadline callback: ``{"dag_run": {dag_id,
    dag_run_id, queued_at, state, ...}, "deadline": {"id", "deadline_time"}}``. Returns True when
    the miss was written now (False: an earlier call recorded it).

    :raises StoreError: the artifact store cannot be written (the callback then shows failed).
    """
    from nightshift.contracts import DeadlineMiss, deadline_miss_text
    from nightshift.state import record_deadline_miss as record
    from nightshift.operators.base import artifact_store

    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    miss = DeadlineMiss(model=model_name, dag_id=str(run.get("dag_id")), run_id=str(run.get("dag_run_id")),
                        deadline_time=_iso(deadline.get("deadline_time")), queued_at=_iso(run.get("queued_at")),
                        interval_s=float(interval_s), run_state=run.get("state"))
    written = record(artifact_store(), miss)
    log.warning("%s %s: %s%s", miss.dag_id, miss.run_id, deadline_miss_text(miss.deadline_time, interval_s,
                                                                            miss.queued_at),
                "" if written else " (already recorded)")
    return written


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
