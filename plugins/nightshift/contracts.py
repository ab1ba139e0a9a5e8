"""Contracts between tasks, DAGs, the serving image and the Nightshift view.

One place for the names several parts of Nightshift read and write: registry
aliases and tag names, the files each run leaves behind, the promotion
history, the deployment state and the drift timeline (read and written
through the artifact store, :mod:`nightshift.store`). Documented in
``docs/contracts.md``. Airflow-free and dependency-free.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from nightshift.store import as_store  # noqa: F401 - re-exported: every state function takes a Store or a folder

if TYPE_CHECKING:
    from nightshift.store import Store

# --------------------------------------------------------------------------- registry (MLflow)

#: Alias of the version that serves.
CHAMPION = "champion"
#: Alias of the newest candidate, promoted or not.
CHALLENGER = "challenger"
#: Prefix of every Nightshift tag on a model version.
TAG_PREFIX = "nightshift."
#: Prefix of the per-gate tags: ``gate.<name>`` = JSON {passed, observed, threshold}.
GATE_TAG_PREFIX = "gate."


class VersionTag:
    """Tag names (without :data:`TAG_PREFIX`) on a registered model version."""

    SNAPSHOT_URI = "snapshot_uri"      # the collection record the model was trained on
    COLLECTION_ID = "collection_id"
    DATA_DIGEST = "data_digest"
    OFFLINE_ACCURACY = "offline_accuracy"
    SERVED_ACCURACY = "served_accuracy"
    P95_LATENCY_MS = "p95_latency_ms"
    IMAGE = "image"                    # inference image reference
    IMAGE_ID = "image_id"              # its content digest (sha256:...)
    ONNX_SHA256 = "onnx_sha256"
    DAG_RUN = "dag_run"
    DRIFT_SHARE = "drift_share"
    DECISION = "decision"              # BLESSED / NOT_BLESSED
    REASON = "reason"
    BASELINE_VERSION = "baseline_version"  # the champion the decision compared with ("none")
    APPROVED_BY = "approved_by"
    # the training data's identity, compared by the next run's promote (a run on other data
    # waits for a person): the snapshot's source without its rolling partitions (JSON), the
    # class list in label order (JSON) and the partition window ("none": not partitioned)
    DATA_SOURCE = "data_source"
    DATA_CLASSES = "data_classes"
    PARTITION_WINDOW = "partition_window"
    DATA_CHANGED = "data_changed"      # JSON list: how this run's data differs from the champion's
    APPROVAL_COMMENT = "approval_comment"


def tag(name: str) -> str:
    return f"{TAG_PREFIX}{name}"


# --------------------------------------------------------------------------- run artifacts

#: The report files a task writes into its folder of the run folder (writers and readers both
#: take the names from here).
VALIDATION_FILE = "validation.json"
PARITY_FILE = "parity.json"
QUANTIZATION_FILE = "quantization.json"
SYSTEM_EVAL_FILE = "system_eval.json"
DRIFT_HTML_FILE = "drift_report.html"
DRIFT_JSON_FILE = "drift_report.json"
PROMOTION_FILE = "promotion.json"
TRAIN_MANIFEST_FILE = "train_manifest.json"

#: Files a nightly_retrain run leaves in ``<artifact_root>/runs/<dag_id>/<run_id>/``: each task
#: writes into the folder named here (``NightshiftOperator.run_dir(context, <folder>)``).
RUN_REPORTS: dict[str, str] = {
    "validation": f"validation/{VALIDATION_FILE}",
    "parity": f"model/{PARITY_FILE}",
    "quantization": f"model/{QUANTIZATION_FILE}",
    "system_eval": f"system_eval/{SYSTEM_EVAL_FILE}",
    "drift": f"drift/{DRIFT_HTML_FILE}",
    "drift_json": f"drift/{DRIFT_JSON_FILE}",
    "promotion": PROMOTION_FILE,
    "training": f"train/{TRAIN_MANIFEST_FILE}",
}


# --------------------------------------------------------------------------- the store of shared state
#
# The promotion history, the deployment state, the drift timeline and the retrain-start record are
# shared by every worker, the Airflow API server (the Nightshift view) and the scheduler (the run
# note): they are read and written through the artifact store (:mod:`nightshift.store`), never as
# files of one worker's working copy. With a local root the store is the folder itself, and the
# files are what they always were (``history.jsonl``, ``state.json``, ``timeline.jsonl``, ...).


def history_rel(model_name: str) -> str:
    """Where the promotion history of ``model_name`` is, relative to the artifact root."""
    return f"registry/{model_name}/history.jsonl"


def history_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """The promotion history's file under a local root (JSON Lines); on an object store
    read it with :func:`read_history`."""
    return Path(artifact_root) / history_rel(model_name)


@dataclass
class HistoryEvent:
    """One line of the promotion history.

    ``action``: ``promoted`` (gates passed), ``rejected`` (gates failed, champion
    unchanged), ``forced`` (``promote_model``), ``rolled_back`` (``rollback_model``).

    ``key`` makes the append idempotent (:func:`append_history`): by default, for an event
    of a DAG run (``run_id`` set), ``<dag_id>/<run_id>/<model>/v<version>/<action>``, so a
    retried task that records the same move again writes it once. Events without a run
    (a script, a test) get no key and are always appended.
    """

    model: str
    action: str
    version: str | None
    previous_champion: str | None
    champion: str | None
    reason: str
    actor: str = "nightshift"
    dag_id: str | None = None
    run_id: str | None = None
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    extra: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.key is None and self.run_id:
            self.key = history_key(self.model, self.version, self.action, run_id=self.run_id, dag_id=self.dag_id)


def history_key(model: str, version: str | None, action: str, *, run_id: str, dag_id: str | None = None) -> str:
    """The idempotency key of a history event written by a DAG run."""
    return f"{dag_id or '-'}/{run_id}/{model}/v{version}/{action}"


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


# --------------------------------------------------------------------------- deployment and drift


def retrain_started_rel(dag_id: str) -> str:
    """JSON ``{"started_at": ISO 8601, "run_id": ...}``: when the last retrain of ``dag_id`` that
    passed its cooldown started (the drift-retrain cooldown reads it; Airflow gives asset-triggered
    runs no previous successful run to compare with)."""
    return f"state/{dag_id}/last_retrain.json"


def retrain_started_path(artifact_root: str | os.PathLike, dag_id: str) -> Path:
    """:func:`retrain_started_rel` under a local root."""
    return Path(artifact_root) / retrain_started_rel(dag_id)


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


def deployment_rel(model_name: str) -> str:
    """JSON: what serves ``model_name`` now (version, image, url, container, since)."""
    return f"deployments/{model_name}/state.json"


def deployment_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """:func:`deployment_rel` under a local root (the deploy host's working copy)."""
    return Path(artifact_root) / deployment_rel(model_name)


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


def drift_timeline_rel(model_name: str) -> str:
    """JSON Lines: one record per drift check (time, window, status, drifted share, rows, report)."""
    return f"drift/{model_name}/timeline.jsonl"


def drift_timeline_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """:func:`drift_timeline_rel` under a local root."""
    return Path(artifact_root) / drift_timeline_rel(model_name)


def append_drift_point(store: str | os.PathLike | Store, model_name: str, point: dict[str, Any],
                       *, key: str | None = None) -> bool:
    """Add one drift check to the timeline of ``model_name``, once per ``key`` (a retried check of
    the same DAG run records its first point only); True when written."""
    return as_store(store).append_record(drift_timeline_rel(model_name), point, key=key)


def read_drift_timeline(store: str | os.PathLike | Store, model_name: str, *,
                        limit: int | None = None) -> list[dict[str, Any]]:
    """The drift checks of ``model_name``, oldest first; ``limit``: only the newest."""
    return as_store(store).read_records(drift_timeline_rel(model_name), limit=limit)


def request_log_dir(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """Where the serving container of ``model_name`` writes its sampled request log: a folder
    of the Docker host's working copy, mounted into the container. It stays on that host (the
    container appends to it); the drift monitor reads it there, on the Docker queue, and
    publishes what it read with its report (:class:`nightshift.operators.monitor.DriftMonitorOperator`)."""
    return Path(artifact_root) / "request_logs" / model_name


# --------------------------------------------------------------------------- deadlines


def deadline_misses_rel(model_name: str) -> str:
    """JSON Lines: one record per nightly run of ``model_name`` that missed its deadline."""
    return f"deadlines/{model_name}/misses.jsonl"


@dataclass
class DeadlineMiss:
    """A nightly run that was not done by its deadline (Airflow Deadline Alerts: ``interval_s``
    after the run was queued). Recorded once per run (``key`` = ``<dag_id>/<run_id>``), when the
    scheduler finds the deadline passed; the run may still be going (``run_state``)."""

    model: str
    dag_id: str
    run_id: str
    deadline_time: str | None
    queued_at: str | None
    interval_s: float
    run_state: str | None = None
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    key: str | None = None

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = f"{self.dag_id}/{self.run_id}"


def record_deadline_miss(store: str | os.PathLike | Store, miss: DeadlineMiss) -> bool:
    """Append ``miss`` to its model's record, once per run (a callback run twice writes it once).
    True when written."""
    return as_store(store).append_record(deadline_misses_rel(miss.model), asdict(miss), key=miss.key)


def read_deadline_misses(store: str | os.PathLike | Store, model_name: str, *,
                         limit: int | None = None) -> list[dict[str, Any]]:
    """The deadline misses of ``model_name``, oldest first; ``limit``: only the newest."""
    return as_store(store).read_records(deadline_misses_rel(model_name), limit=limit)


def deadline_miss_text(deadline_time: Any, interval_s: float, queued_at: Any = None) -> str:
    """One line for the run note and the view: ``DEADLINE MISSED: not done by <time> (4h after it
    was queued at <time>)``."""
    from nightshift.model_config import format_duration

    def iso(v: Any) -> str:
        return v.isoformat(timespec="seconds") if isinstance(v, datetime) else str(v)

    after = f"{format_duration(interval_s)} after it was queued" + (f" at {iso(queued_at)}" if queued_at else "")
    return f"DEADLINE MISSED: not done by {iso(deadline_time)} ({after})"
