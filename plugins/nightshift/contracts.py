"""Contracts between tasks, DAGs, the serving image and the Nightshift view.

One place for the names several parts of Nightshift read and write: registry
aliases and tag names, the files each run leaves behind, the promotion
history, the deployment state and the drift timeline. Documented in
``docs/contracts.md``. Airflow-free and dependency-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

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

#: Files a nightly_retrain run leaves in ``<artifact_root>/runs/<dag_id>/<run_id>/``.
RUN_REPORTS: dict[str, str] = {
    "validation": "validation/validation.json",
    "parity": "model/parity.json",
    "quantization": "model/quantization.json",
    "system_eval": "system_eval/system_eval.json",
    "drift": "drift/drift_report.html",
    "drift_json": "drift/drift_report.json",
    "promotion": "promotion.json",
    "training": "train/train_manifest.json",
}


# --------------------------------------------------------------------------- promotion history


def history_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """Append-only JSON Lines log of every move of ``champion`` (and every rejection)."""
    return Path(artifact_root) / "registry" / model_name / "history.jsonl"


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


def append_history(artifact_root: str | os.PathLike, event: HistoryEvent) -> Path:
    """Append one event, once: an event whose ``key`` the history already holds is not written again.

    The read and the append happen under an exclusive ``flock`` of the history file, so two
    writers cannot both find a key missing and both append it; the line is one ``write``.
    """
    import fcntl

    from nightshift.artifacts import json_safe

    path = history_path(artifact_root, event.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(json_safe(asdict(event)), sort_keys=True) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            if event.key is not None:
                f.seek(0)
                for raw in f:
                    try:
                        if json.loads(raw).get("key") == event.key:
                            return path
                    except ValueError:  # a torn line (writer killed): not this event
                        continue
            end = f.seek(0, os.SEEK_END)
            if end:  # a torn last line without its newline must not swallow this event
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON Lines file; a torn last line (writer killed) is skipped."""
    p = Path(path)
    if not p.is_file():
        return
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue


# --------------------------------------------------------------------------- deployment and drift


def retrain_started_path(artifact_root: str | os.PathLike, dag_id: str) -> Path:
    """JSON ``{"started_at": ISO 8601, "run_id": ...}``: when the last retrain of ``dag_id`` that
    passed its cooldown started (the drift-retrain cooldown reads it; Airflow gives asset-triggered
    runs no previous successful run to compare with)."""
    return Path(artifact_root) / "state" / dag_id / "last_retrain.json"


def last_retrain_start(artifact_root: str | os.PathLike, dag_id: str):
    """The ``datetime`` :func:`record_retrain_start` wrote last, or ``None``.

    :raises ValueError: the file exists but cannot be read (the cooldown then fails: a retrain
        storm must not pass through a broken record unseen).
    """
    import datetime as _dt
    import json

    path = retrain_started_path(artifact_root, dag_id)
    if not path.is_file():
        return None
    try:
        return _dt.datetime.fromisoformat(json.loads(path.read_text())["started_at"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); delete it to reset the retrain cooldown") from exc


def record_retrain_start(artifact_root: str | os.PathLike, dag_id: str, when, run_id: str) -> Path:
    from nightshift.artifacts import atomic_write_json

    return atomic_write_json(retrain_started_path(artifact_root, dag_id),
                             {"started_at": when.isoformat(), "run_id": run_id})


def deployment_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """JSON: what serves ``model_name`` now (version, image, url, container, since)."""
    return Path(artifact_root) / "deployments" / model_name / "state.json"


def drift_timeline_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """JSON Lines: one record per drift check (time, window, status, drifted share, rows, report)."""
    return Path(artifact_root) / "drift" / model_name / "timeline.jsonl"


def request_log_dir(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """Where the serving container of ``model_name`` writes its sampled request log (mounted)."""
    return Path(artifact_root) / "request_logs" / model_name
