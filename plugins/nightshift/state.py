"""Shared state, read and written through the artifact store (:mod:`nightshift.store`).

The promotion history, the deployment state, the drift timeline, the retrain-start
record and the deadline misses are shared by every worker, the Airflow API server
(the Nightshift view) and the scheduler (the run note), so they never live in one
worker's working copy. With a local root the store is the folder itself and the
files are what they always were (``history.jsonl``, ``state.json``,
``timeline.jsonl``, ...). Where each lives and what a record holds is
:mod:`nightshift.contracts`. Every function takes a :class:`~nightshift.store.Store`
or a local root folder. Airflow-free.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from nightshift.contracts import (DeadlineMiss, HistoryEvent, deadline_misses_rel, deployment_rel, drift_timeline_rel,
                                  history_rel, retrain_started_rel)
from nightshift.store import Store, as_store


def append_history(store: str | os.PathLike | Store, event: HistoryEvent) -> bool:
    """Append one event, once: an event whose ``key`` the history already holds is not written
    again, whichever worker wrote it (:meth:`~nightshift.store.Store.append_record`: under an
    ``flock`` of ``history.jsonl`` locally, a conditional create of the key's object on S3).
    True when written."""
    return as_store(store).append_record(history_rel(event.model), asdict(event), key=event.key)


def read_history(store: str | os.PathLike | Store, model_name: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The promotion history of ``model_name``, oldest first (``[]`` when there is none); ``limit``:
    only the newest events."""
    return as_store(store).read_records(history_rel(model_name), limit=limit)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a local JSON Lines file; a torn line (writer killed) is skipped. Shared state
    is read with :func:`read_history` / :func:`read_drift_timeline` instead."""
    from nightshift.store import LocalStore

    p = Path(path)
    yield from LocalStore(p.parent).read_records(p.name)


def last_retrain_start(store: str | os.PathLike | Store, dag_id: str):
    """The ``datetime`` :func:`record_retrain_start` wrote last, or ``None``.

    :raises ValueError: the record exists but cannot be read (the cooldown then fails: a retrain
        storm must not pass through a broken record unseen).
    """
    import datetime as _dt

    from nightshift.store import StoreError

    store = as_store(store)
    rel = retrain_started_rel(dag_id)
    try:
        record = store.read_json(rel)
        if record is None:
            return None
        return _dt.datetime.fromisoformat(record["started_at"])
    except (StoreError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, StoreError) and exc.retryable:
            raise  # the store is unreachable: say so, not "unreadable"
        raise ValueError(f"{store.to_uri(store.local_root / rel)} is unreadable ({exc}); delete it to reset the "
                         "retrain cooldown") from exc


def record_retrain_start(store: str | os.PathLike | Store, dag_id: str, when, run_id: str) -> str:
    """Record that a retrain of ``dag_id`` started at ``when``; returns where (URI or path)."""
    return as_store(store).write_json(retrain_started_rel(dag_id), {"started_at": when.isoformat(), "run_id": run_id})


def read_deployment(store: str | os.PathLike | Store, model_name: str) -> dict[str, Any] | None:
    """What serves ``model_name`` now, as the last deploy recorded it; ``None`` when nothing does.

    :raises StoreError: the state cannot be read (unreachable store, not JSON).
    """
    state = as_store(store).read_json(deployment_rel(model_name))
    return state if isinstance(state, dict) else None


def write_deployment(store: str | os.PathLike | Store, model_name: str, state: dict[str, Any]) -> str:
    """Record what serves ``model_name`` (whole object, atomic) and append it to the
    deployment log (``deployments/<model>/history.jsonl``)."""
    store = as_store(store)
    where = store.write_json(deployment_rel(model_name), state)
    store.append_record(f"deployments/{model_name}/history.jsonl", state)
    return where


def clear_deployment(store: str | os.PathLike | Store, model_name: str) -> None:
    """Nothing serves ``model_name`` any more (undeploy): its state goes."""
    store = as_store(store)
    store.delete(deployment_rel(model_name))


def append_drift_point(store: str | os.PathLike | Store, model_name: str, point: dict[str, Any],
                       *, key: str | None = None) -> bool:
    """Add one drift check to the timeline of ``model_name``, once per ``key`` (a retried check of
    the same DAG run records its first point only); True when written."""
    return as_store(store).append_record(drift_timeline_rel(model_name), point, key=key)


def read_drift_timeline(store: str | os.PathLike | Store, model_name: str, *,
                        limit: int | None = None) -> list[dict[str, Any]]:
    """The drift checks of ``model_name``, oldest first; ``limit``: only the newest."""
    return as_store(store).read_records(drift_timeline_rel(model_name), limit=limit)


def record_deadline_miss(store: str | os.PathLike | Store, miss: DeadlineMiss) -> bool:
    """Append ``miss`` to its model's record, once per run (a callback run twice writes it once).
    True when written."""
    return as_store(store).append_record(deadline_misses_rel(miss.model), asdict(miss), key=miss.key)


def read_deadline_misses(store: str | os.PathLike | Store, model_name: str, *,
                         limit: int | None = None) -> list[dict[str, Any]]:
    """The deadline misses of ``model_name``, oldest first; ``limit``: only the newest."""
    return as_store(store).read_records(deadline_misses_rel(model_name), limit=limit)
