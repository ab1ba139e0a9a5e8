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


def append_history(artifact_root: str | os.PathLike, event: HistoryEvent) -> Path:
    """Append one event (a single ``write`` of one line, so concurrent writers do not interleave)."""
    from nightshift.artifacts import append_jsonl

    return append_jsonl(history_path(artifact_root, event.model), asdict(event))


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
