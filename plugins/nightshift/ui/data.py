"""What the Nightshift view shows, assembled from the registry and the artifact root.

Airflow-free: :func:`build_overview` takes the artifact store and an MLflow client and
returns plain JSON-able dicts; the FastAPI app renders them. Every source may be
missing (no model registered yet, no deployment, no drift check): the view then
says "none yet" rather than failing.

Everything is read through the artifact store (:mod:`nightshift.store`): with an
``s3://`` root the view (in the Airflow API server) has its own working copy, and the
history, deployment state, drift timeline and reports are the ones the workers
published, not files of this machine.

Report files are addressed by their path relative to the artifact root
(``runs/<dag>/<run>/...``, ``drift/...``, ``registry/...``);
:func:`resolve_report` is the only way from such a path to a file (fetched into the
working copy when the root is an object store), and it refuses anything outside
those folders.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nightshift.artifacts import folder_name, read_run_meta, run_path
from nightshift.contracts import (
    CHALLENGER,
    CHAMPION,
    GATE_TAG_PREFIX,
    RUN_REPORTS,
    TAG_PREFIX,
    VersionTag,
    as_store,
    deadline_miss_text,
    read_deadline_misses,
    read_deployment,
    read_drift_timeline,
    read_history,
)
from nightshift.store import Store, StoreError

#: Top-level folders of the artifact root whose files the plugin serves.
SERVED_FOLDERS = ("runs", "drift", "registry")
#: Reports shown per version, in this order, with the label the view uses.
REPORT_LABELS = {
    "validation": "validation",
    "parity": "parity",
    "system_eval": "system eval",
    "drift": "drift",
    "promotion": "decision",
    "training": "training",
}
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI that links point to (``NIGHTSHIFT_MLFLOW_UI_URL``)."""
    return os.environ.get("NIGHTSHIFT_MLFLOW_UI_URL", DEFAULT_MLFLOW_UI_URL).rstrip("/")


def mlflow_run_url(run_id: str) -> str:
    return f"{mlflow_ui_url()}/#/runs/{run_id}"


def mlflow_version_url(model_name: str, version: str) -> str:
    return f"{mlflow_ui_url()}/#/models/{model_name}/versions/{version}"


# --------------------------------------------------------------------------- reports


def _served_parts(rel_path: str) -> list[str] | None:
    """``rel_path``'s parts when it names something inside a served folder, else None."""
    if not rel_path or "\x00" in rel_path or rel_path.startswith(("/", "\\")):
        return None
    parts = rel_path.replace("\\", "/").split("/")
    if ".." in parts:
        return None  # the caller authorizes on the path's folders: they must be the real ones
    return parts


def resolve_report(artifact_root: Store | str | os.PathLike, rel_path: str) -> Path | None:
    """The file ``rel_path`` names under the artifact root, or None.

    None unless the resolved path (symlinks followed) is a regular file inside
    ``<root>/runs``, ``<root>/drift`` or ``<root>/registry``: ``..``, absolute
    paths and links that leave those folders are refused. With an object store the
    object is downloaded into the working copy first (only a single object, never a folder).
    """
    parts = _served_parts(rel_path)
    if parts is None:
        return None
    store = as_store(artifact_root)
    if store.remote:
        if len(parts) < 2 or parts[0] not in SERVED_FOLDERS or any(p in ("", ".") for p in parts):
            return None
        path = store.fetch_file("/".join(parts))
        return path.resolve() if path is not None else None
    root = store.local_root.resolve()
    try:
        target = (root / rel_path).resolve()
    except (OSError, RuntimeError):
        return None
    for folder in SERVED_FOLDERS:
        base = root / folder
        if target.is_relative_to(base) and target != base:
            return target if target.is_file() else None
    return None


def report_rel_path(artifact_root: Store | str | os.PathLike, path: str | os.PathLike | None) -> str | None:
    """``path`` (a URI, a path under the root, or a path relative to it) as a served report
    path, or None. With an object store the object is not looked up (one request per history
    line): a report that is gone answers 404 when opened."""
    if not path:
        return None
    store = as_store(artifact_root)
    if store.remote:
        text = str(path)
        rel = store.rel(text) if "://" in text or text.startswith("/") else text
        parts = _served_parts(rel or "")
        ok = parts is not None and len(parts) >= 2 and parts[0] in SERVED_FOLDERS and "" not in parts
        return "/".join(parts) if ok else None
    root = store.local_root.resolve()
    p = Path(str(path).removeprefix("file://"))
    p = (p if p.is_absolute() else root / p).resolve()
    if not p.is_relative_to(root):
        return None
    rel = p.relative_to(root).as_posix()
    return rel if resolve_report(root, rel) else None


def _run_meta(store: Store, folder_rel: str) -> dict[str, str] | None:
    """The ``run.json`` of a run folder (relative to the root), as :func:`read_run_meta` reads it."""
    if store.remote:
        f = store.fetch_file(f"{folder_rel}/run.json")
        return read_run_meta(f.parent) if f is not None else None
    return read_run_meta(store.local_root.resolve() / folder_rel)


def _find_run(store: Store, run_id: str, dag_id: str | None = None) -> dict[str, str] | None:
    """The reports (:data:`RUN_REPORTS` name -> path relative to the root) that the folder of DAG
    run ``run_id`` (of ``dag_id``, or of any DAG) holds; None when there is no such folder.

    Without ``dag_id`` the first DAG folder (sorted) holding a folder for ``run_id`` whose
    ``run.json`` does not name another run is taken. With an object store: one listing of the
    DAG folders and one of each candidate run folder, no download.
    """
    if not store.remote:
        folder = run_folder(store.local_root, run_id, dag_id)
        if folder is None:
            return None
        root = store.local_root.resolve()
        out = {}
        for name, rel in RUN_REPORTS.items():
            f = folder / rel
            if f.is_file() and f.resolve().is_relative_to(root):
                out[name] = f.resolve().relative_to(root).as_posix()
        return out
    dags = [folder_name(dag_id)] if dag_id else sorted(store.children("runs"))
    for d in dags:
        folder = f"runs/{d}/{folder_name(run_id)}"
        files = store.files(folder)
        if not files:
            continue
        meta = _run_meta(store, folder) if not dag_id and f"{folder}/run.json" in files else None
        if meta is None or meta["run_id"] == run_id:
            return {name: f"{folder}/{rel}" for name, rel in RUN_REPORTS.items() if f"{folder}/{rel}" in files}
    return None


def run_folder(artifact_root: str | os.PathLike, run_id: str, dag_id: str | None = None) -> Path | None:
    """The artifact folder of DAG run ``run_id`` (of ``dag_id``, or of any DAG) under a local root.

    Without ``dag_id`` the first DAG folder (sorted) holding a folder for
    ``run_id`` whose ``run.json`` does not name another run is taken.
    """
    if dag_id:
        p = run_path(artifact_root, dag_id, run_id)
        return p if p.is_dir() else None
    runs = Path(artifact_root) / "runs"
    if not runs.is_dir():
        return None
    for d in sorted(runs.iterdir()):
        p = d / folder_name(run_id)
        meta = read_run_meta(p)
        if p.is_dir() and (meta is None or meta["run_id"] == run_id):
            return p
    return None


def report_dag_id(artifact_root: Store | str | os.PathLike, rel_path: str) -> str | None:
    """The DAG a served report under ``runs/`` belongs to, as its run folder's
    ``run.json`` records it; None when the folder records none, or one whose
    folder name is not where that DAG's runs go (the caller then fails closed)."""
    parts = Path(rel_path).parts
    if len(parts) < 4 or parts[0] != "runs":  # runs/<dag folder>/<run folder>/<file...>
        return None
    meta = _run_meta(as_store(artifact_root), "/".join(parts[:3]))
    if meta is None or run_path("", meta["dag_id"], meta["run_id"]).parts[-2:] != tuple(parts[1:3]):
        return None
    return meta["dag_id"]


def run_reports(artifact_root: Store | str | os.PathLike, run_id: str | None, dag_id: str | None = None, *,
                found: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The reports a run left behind: ``[{"name", "label", "path"}]`` (paths relative to the root).

    :param found: the run's reports (:func:`_find_run`) when already looked up.
    """
    if not run_id:
        return []
    found = found if found is not None else _find_run(as_store(artifact_root), run_id, dag_id)
    return [{"name": name, "label": label, "path": found[name]}
            for name, label in REPORT_LABELS.items() if name in (found or {})]


def validation_outliers(artifact_root: Store | str | os.PathLike, run_id: str | None, dag_id: str | None = None,
                        show: int = 10, *, found: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The appearance outliers a run's validation report lists (tolerated or not), or None when the
    run left no readable report: ``{"outliers", "checks": [{"check", "column", "range", "outliers",
    "share", "max_share", "passed", "images" (the first ``show``), "more"}]}``."""
    store = as_store(artifact_root)
    if found is None and run_id:
        found = _find_run(store, run_id, dag_id)
    if not run_id or not found or "validation" not in found:
        return None
    try:
        path = resolve_report(store, found["validation"])
        body = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError, StoreError):
        return None
    summary = body.get("summary", body) if isinstance(body, dict) else {}
    entries = summary.get("appearance") if isinstance(summary, dict) else None
    if not isinstance(entries, list):
        return None  # a report from before appearance outliers were listed
    checks = []
    for a in entries:
        if not isinstance(a, dict):
            continue
        images = [i for i in (a.get("images") or []) if isinstance(i, dict)][:show]
        count = int(a.get("outliers") or 0)
        low, high = (list(a.get("range") or []) + [None, None])[:2]
        allowed = f"[{low:g}, {high:g}]" if low is not None and high is not None else (
            f">= {low:g}" if low is not None else f"<= {high:g}" if high is not None else "")
        checks.append({"check": a.get("check"), "column": a.get("column"), "range": allowed,
                       "outliers": count, "share": a.get("share"), "max_share": a.get("max_share"),
                       "passed": a.get("passed"), "images": images, "more": max(0, count - len(images))})
    stats = summary.get("statistics") if isinstance(summary.get("statistics"), dict) else {}
    total = stats.get("appearance_outliers")
    return {"outliers": int(total) if isinstance(total, int) else sum(c["outliers"] for c in checks),
            "checks": checks}


# --------------------------------------------------------------------------- registry


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _gates(tags: dict[str, str]) -> list[dict[str, Any]]:
    gates = []
    for key, value in sorted(tags.items()):
        if not key.startswith(GATE_TAG_PREFIX):
            continue
        try:
            g = json.loads(value)
        except ValueError:
            g = {"observed": value}
        if not isinstance(g, dict):
            g = {"observed": g}
        gates.append({"name": key[len(GATE_TAG_PREFIX):], "passed": g.get("passed"),
                      "observed": g.get("observed"), "threshold": g.get("threshold")})
    return gates


def approval_text(ns: dict[str, str]) -> str | None:
    """How a version's approval ended, from its tags (``approval``, ``approved_by``,
    ``superseded_by``): ``approved by bob``, ``rejected by carol``, ``superseded by v7``, ...
    The name in ``approved_by`` is whoever answered, whatever the answer was."""
    state, who = ns.get("approval"), ns.get(VersionTag.APPROVED_BY)
    by = f" by {who}" if who else ""
    if state == "approved":
        return f"approved{by}"
    if state == "rejected":
        return f"rejected{by}"
    if state == "stale":
        return f"approved{by}, stale: champion moved while it waited (not promoted)"
    if state == "undeployable":
        return f"approved{by}, but not deployable (not promoted)"
    if state == "superseded":
        newer = ns.get("superseded_by")
        text = f"superseded by v{newer}" if newer else "superseded"
        return text + (f" ({who} answered too late)" if who else " before anyone answered")
    if ns.get("awaiting_approval") == "true":
        return "awaiting approval"
    if who:  # an answer recorded without its outcome
        return f"answered by {who}"
    return None


def version_view(artifact_root: Store | str | os.PathLike, model_name: str, mv: Any,
                 aliases_by_version: dict[str, list[str]]) -> dict[str, Any]:
    """One model version as the view shows it."""
    store = as_store(artifact_root)
    tags = dict(mv.tags or {})
    ns = {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
    version = str(mv.version)
    run_id = ns.get(VersionTag.DAG_RUN)
    found = _find_run(store, run_id) if run_id else None  # one look-up for the reports and the outliers
    return {
        "version": version,
        "aliases": aliases_by_version.get(version, []),
        "created": _iso(getattr(mv, "creation_timestamp", None)),
        "decision": ns.get(VersionTag.DECISION),
        "reason": ns.get(VersionTag.REASON, ""),
        "baseline_version": ns.get(VersionTag.BASELINE_VERSION),
        "gates": _gates(tags),
        "image": ns.get(VersionTag.IMAGE),
        "image_id": ns.get(VersionTag.IMAGE_ID),
        "data_digest": ns.get(VersionTag.DATA_DIGEST),
        "offline_accuracy": ns.get(VersionTag.OFFLINE_ACCURACY),
        "served_accuracy": ns.get(VersionTag.SERVED_ACCURACY),
        "p95_latency_ms": ns.get(VersionTag.P95_LATENCY_MS),
        "approved_by": ns.get(VersionTag.APPROVED_BY),
        "approval": ns.get("approval"),
        "approval_text": approval_text(ns),
        "dag_run": run_id,
        "tags": ns,
        "mlflow_run_id": mv.run_id,
        "mlflow_run_url": mlflow_run_url(mv.run_id) if mv.run_id else None,
        "mlflow_version_url": mlflow_version_url(model_name, version),
        "reports": run_reports(store, run_id, found=found),
        "validation": validation_outliers(store, run_id, found=found),
    }


def _history(store: Store, model_name: str, limit: int) -> list[dict[str, Any]]:
    events = read_history(store, model_name, limit=limit)[::-1]
    for e in events:
        extra = e.get("extra") if isinstance(e.get("extra"), dict) else {}
        e["report_path"] = report_rel_path(store, extra.get("report"))
    return events


def _drift(store: Store, model_name: str, limit: int) -> list[dict[str, Any]]:
    points = read_drift_timeline(store, model_name, limit=limit)[::-1]
    for p in points:
        p["report_path"] = report_rel_path(store, p.get("report"))
    return points


def _deadline_misses(store: Store, model_name: str, limit: int) -> list[dict[str, Any]]:
    """The model's nightly runs that missed their deadline, newest first, each with its text."""
    try:
        misses = read_deadline_misses(store, model_name, limit=limit)[::-1]
    except StoreError as exc:
        if exc.retryable:
            raise
        return []
    for m in misses:
        m["text"] = deadline_miss_text(m.get("deadline_time"), float(m.get("interval_s") or 0), m.get("queued_at"))
    return misses


def _deployment(store: Store, model_name: str) -> dict[str, Any] | None:
    try:
        return read_deployment(store, model_name)
    except StoreError as exc:
        if exc.retryable:  # the store is unreachable: an error, not "nothing deployed"
            raise
        return None  # an unreadable state shows as none


def model_view(artifact_root: Store | str | os.PathLike, client: Any, model: Any, *, max_versions: int = 30,
               max_events: int = 50, config: Any = None) -> dict[str, Any]:
    """One registered model: aliases, versions (newest first), deployment, history, drift timeline,
    deadline misses, and its entry of the models file (``config``: a
    :class:`~nightshift.model_config.ModelEntry`, None when the file does not list it)."""
    root = as_store(artifact_root)
    name = model.name
    aliases = {str(a): str(v) for a, v in (getattr(model, "aliases", None) or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):
        by_version.setdefault(v, []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    versions = sorted(versions, key=lambda mv: int(mv.version), reverse=True)
    return {
        "name": name,
        "description": getattr(model, "description", "") or "",
        "champion": aliases.get(CHAMPION),
        "challenger": aliases.get(CHALLENGER),
        "aliases": aliases,
        "n_versions": len(versions),
        "versions": [version_view(root, name, mv, by_version) for mv in versions[:max_versions]],
        "deployment": _deployment(root, name),
        "history": _history(root, name, max_events),
        "drift": _drift(root, name, max_events),
        "deadline_misses": _deadline_misses(root, name, max_events),
        "config": config.as_dict() if config is not None else None,
    }


def _model_names_on_disk(store: Store) -> set[str]:
    """Models with a history, deployment or drift timeline but (maybe) nothing registered."""
    names: set[str] = set()
    for folder in ("registry", "deployments", "drift", "deadlines"):
        if store.remote:
            names.update(store.children(folder))
            continue
        d = store.local_root / folder
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_dir())
    return names


class _Unregistered:
    """A model the registry does not know (yet): no aliases, no versions."""

    def __init__(self, name: str, description: str = "") -> None:
        self.name, self.aliases, self.description = name, {}, description


class _NoVersions:
    @staticmethod
    def search_model_versions(_filter: str) -> list[Any]:
        return []


def build_overview(artifact_root: Store | str | os.PathLike, client: Any, *, configured: Any = None) -> dict[str, Any]:
    """Everything the Nightshift view shows, for every model.

    :param artifact_root: the artifact store (``Settings.store()``), or a local root folder.
    :param configured: the models file (:class:`~nightshift.model_config.ModelsConfig`): its
        models come first, in file order, also the ones with no version yet; what is wrong
        with the file is in ``config_errors``.

    A registry that cannot be read is reported in ``error`` (the rest of the
    page still renders); registered models the file does not list follow (by name), then
    models known only from files (history, deployment, drift, deadline misses), with no versions.
    """
    root = as_store(artifact_root)
    models: list[dict[str, Any]] = []
    error = None
    try:
        registered = {m.name: m for m in client.search_registered_models()}
    except Exception as exc:  # noqa: BLE001 - show the registry error, keep the page
        registered = {}
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    entries = list(configured.models) if configured is not None else []
    for entry in entries:
        reg = registered.get(entry.name)
        models.append(model_view(root, client if reg is not None else _NoVersions(),
                                 reg if reg is not None else _Unregistered(entry.name, entry.description),
                                 config=entry))
    known = {m["name"] for m in models}
    for name in sorted(set(registered) - known):
        models.append(model_view(root, client, registered[name]))
    known = {m["name"] for m in models}
    for name in sorted(_model_names_on_disk(root) - known):
        models.append(model_view(root, _NoVersions(), _Unregistered(name)))
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "artifact_root": root.uri,
        "mlflow_ui_url": mlflow_ui_url(),
        "registry_error": error,
        "models_file": configured.path if configured is not None else None,
        "config_errors": [str(e) for e in configured.errors] if configured is not None else [],
        "models": models,
    }
