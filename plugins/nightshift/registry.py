"""MLflow tracking and model registry: runs, the candidate's artifacts, the
``champion`` alias. Airflow-free; the operators call these functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nightshift.contracts import CHALLENGER, CHAMPION, TAG_PREFIX
from nightshift.errors import RegistryError
from nightshift.gates import Decision

log = logging.getLogger(__name__)


def client(tracking_uri: str, registry_uri: str | None = None):
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri or tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def experiment_id(c, name: str, artifact_location: str | None = None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - a concurrent run created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def training_run(c, experiment: str, run_name: str, *, tags: dict[str, str], params: dict[str, Any],
                 artifact_location: str | None = None) -> Iterator[str]:
    """Create an MLflow run, yield its id; mark it FINISHED or FAILED on exit."""
    exp_id = experiment_id(c, experiment, artifact_location)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    for k, v in params.items():
        c.log_param(run_id, k, v)
    try:
        yield run_id
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None and v == v]
    if batch:
        c.log_batch(run_id, metrics=batch)


def is_not_found(exc: BaseException) -> bool:
    """True only for MLflow's "this model / version / alias does not exist"."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return isinstance(exc, MlflowException) and exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _registry_error(action: str, model_name: str, exc: BaseException) -> RegistryError:
    code = getattr(exc, "error_code", type(exc).__name__)
    return RegistryError(
        f"the model registry failed while {action} for {model_name!r} ({code}: {str(exc).splitlines()[0][:300] if str(exc) else ''}). "
        "Nothing is promoted while the registry cannot be read; check MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI "
        "and access rights. The task will be retried."
    )


def _version_dict(mv) -> dict[str, Any]:
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags)}


def get_champion(c, model_name: str) -> dict[str, Any] | None:
    """The model version the ``champion`` alias points to, or None (see :func:`get_alias`)."""
    return get_alias(c, model_name, CHAMPION)


def get_alias(c, model_name: str, alias: str) -> dict[str, Any] | None:
    """The model version ``alias`` points to, or None.

    ``None`` means only "the registered model or that alias does not
    exist". Any other registry error (unreachable, permission denied, a broken
    store) raises :class:`RegistryError`: a gate that cannot read the champion
    must not pass as "nothing to beat" (fail closed).
    """
    from mlflow.exceptions import MlflowException

    # The registered model's alias map, not get_model_version_by_alias: stores
    # disagree on the error code of a missing alias (the SQL store says
    # INVALID_PARAMETER_VALUE), and that must not be confused with real errors.
    try:
        rm = c.get_registered_model(model_name)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise _registry_error("reading the registered model", model_name, exc) from exc
    version = (rm.aliases or {}).get(alias)
    if version is None:
        return None
    try:
        mv = c.get_model_version(model_name, str(version))
    except MlflowException as exc:  # the alias names a version: even "not found" is an inconsistency
        raise _registry_error(f"reading {alias} v{version}", model_name, exc) from exc
    return _version_dict(mv)


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        c.get_registered_model(name)
        return
    except MlflowException as exc:
        if not is_not_found(exc):
            raise _registry_error("looking up the registered model", name, exc) from exc
    try:
        c.create_registered_model(name, description="Image classifier retrained by Nightshift's nightly_retrain DAG.")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):  # else: created concurrently
            raise _registry_error("creating the registered model", name, exc) from exc


def find_candidate(c, model_name: str, run_id: str, onnx_sha256: str) -> dict[str, Any] | None:
    """The version already registered for this training run and ONNX file, if any.

    A retried ``promote`` uses it instead of registering a second version.
    """
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise _registry_error("searching model versions", model_name, exc) from exc
    mine = [mv for mv in versions if dict(mv.tags).get(f"{TAG_PREFIX}onnx_sha256") == onnx_sha256]
    if not mine:
        return None
    return _version_dict(min(mine, key=lambda mv: int(mv.version)))


def _gates_from_tags(tags: dict[str, str]) -> list[dict[str, Any]]:
    gates = []
    for key, value in sorted(tags.items()):
        if key.startswith("gate."):
            try:
                g = json.loads(value)
            except ValueError:
                g = {"raw": value}
            gates.append({"name": key[len("gate."):], **g})
    return gates


def resume_candidate(c, model_name: str, existing: dict[str, Any]) -> dict[str, Any]:
    """Finish the promotion of a version a previous try registered.

    The recorded decision stands (it was made on the evidence of the first
    try). If that decision was BLESSED and ``champion`` still points where it
    pointed before (the first try died between registering and moving the
    alias), the alias is moved now; if it already points at this version
    nothing moves; if someone else moved it since, it is left alone.
    """
    tags = existing["tags"]
    version = existing["version"]
    decision = tags.get(f"{TAG_PREFIX}decision")
    if decision is None:
        raise RegistryError(f"{model_name} v{version} was registered for this run but carries no "
                            f"'{TAG_PREFIX}decision' tag; inspect it in MLflow before promoting again")
    blessed = decision == "BLESSED"
    before = tags.get(f"{TAG_PREFIX}baseline_version") or None
    before = None if before == "none" else before
    note = "registered by an earlier try of this task; its recorded decision stands"
    awaiting = tags.get(f"{TAG_PREFIX}awaiting_approval") == "true"
    if awaiting or tags.get(f"{TAG_PREFIX}approval") in ("rejected", "stale", "superseded", "undeployable"):
        blessed = False  # champion moves only through approve_candidate, never after a no, a stale yes or a newer one
    aliases = c.get_registered_model(model_name).aliases or {}
    if str(aliases.get(CHALLENGER)) != version:
        c.set_registered_model_alias(model_name, CHALLENGER, version)
    current_v, moved = _move_champion(c, model_name, version, before) if blessed else (None, "")
    if not blessed:
        current = get_champion(c, model_name)
        current_v = current["version"] if current else None
    if moved:
        note += "; " + moved
    return {
        "model_name": model_name, "version": version, "promoted": blessed and current_v == version,
        "decision": decision, "reason": tags.get(f"{TAG_PREFIX}reason", ""), "previous_champion": before,
        "champion": current_v, "reused": True, "note": note, "recorded_gates": _gates_from_tags(tags),
        "awaiting_approval": awaiting,
    }


def _move_champion(c, model_name: str, version: str, expected: str | None) -> tuple[str | None, str]:
    """Point ``champion`` at ``version`` if it still points at ``expected``.

    Returns ``(champion version now, note)``. The alias moves at most once: if it
    already points at ``version`` nothing is written; if someone else moved it
    since the decision was made, the comparison is stale and it is left alone.
    """
    current = get_champion(c, model_name)
    current_v = current["version"] if current else None
    if current_v == version:
        return version, "champion already pointed at this version"
    if current_v != expected:
        log.warning("%s v%s was blessed against champion v%s, but champion is now v%s: not moving it",
                    model_name, version, expected, current_v)
        return current_v, (f"champion moved from v{expected} to v{current_v} while v{version} was evaluated; "
                           "left there (the comparison would be stale)")
    c.set_registered_model_alias(model_name, CHAMPION, version)
    return version, f"champion alias moved now, from {f'v{expected}' if expected else 'none'} to v{version}"


def register_candidate(c, model_name: str, run_id: str, *, artifact_path: str, tags: dict[str, Any],
                       decision: Decision, require_approval: bool = False) -> dict[str, Any]:
    """Register the run's ONNX model as a new version, record the decision and every
    gate on it, and move ``champion`` only when the decision is BLESSED.

    Idempotent: when a version for this run and ``tags["onnx_sha256"]`` already
    exists (a retried task), it is resumed (:func:`resume_candidate`) instead of
    registering another one.

    The decision's ``baseline`` is the champion it compared with; it is
    recorded on the version, and the alias moves only from there. With
    ``require_approval`` a BLESSED candidate is recorded as awaiting approval and
    ``champion`` does not move (:func:`approve_candidate` moves it).
    """
    previous_champion = decision.baseline
    onnx_sha = tags.get("onnx_sha256")
    if onnx_sha:
        existing = find_candidate(c, model_name, run_id, str(onnx_sha))
        if existing is not None:
            return resume_candidate(c, model_name, existing)
    _ensure_registered_model(c, model_name)
    all_tags = {f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items() if v is not None}
    all_tags[f"{TAG_PREFIX}decision"] = decision.decision
    all_tags[f"{TAG_PREFIX}reason"] = decision.reason[:4900]
    all_tags[f"{TAG_PREFIX}baseline_version"] = str(decision.baseline or "none")
    if decision.blessed and require_approval:
        all_tags[f"{TAG_PREFIX}awaiting_approval"] = "true"
    for g in decision.gates:
        recorded = {"passed": g.passed, "observed": g.observed, "threshold": g.threshold}
        recorded.update({k: v for k, v in (("n", g.n), ("ci95", g.ci95)) if v is not None})
        all_tags[f"gate.{g.name}"] = json.dumps(recorded)
    source = f"runs:/{run_id}/{artifact_path}"
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=all_tags,
                                description=f"{decision.decision}: {decision.reason}"[:4900])
    version = str(mv.version)
    c.set_registered_model_alias(model_name, CHALLENGER, version)  # every candidate is the challenger
    champion, note = previous_champion, "registered now"
    awaiting = decision.blessed and require_approval
    if decision.blessed and not awaiting:
        champion, moved = _move_champion(c, model_name, version, previous_champion)
        note += "; " + moved
    elif awaiting:
        note += "; BLESSED, waiting for a person's approval before champion moves"
    return {
        "model_name": model_name, "version": version, "promoted": decision.blessed and champion == version,
        "decision": decision.decision, "reason": decision.reason, "previous_champion": previous_champion,
        "champion": champion, "reused": False, "note": note, "awaiting_approval": awaiting,
    }


def log_artifacts(c, run_id: str, local_dir: str | Path, artifact_path: str, *,
                  exclude: tuple[str, ...] = ()) -> None:
    """Upload ``local_dir`` under ``artifact_path``; top-level files named in ``exclude`` stay local."""
    local_dir = Path(local_dir)
    if not exclude:
        c.log_artifacts(run_id, str(local_dir), artifact_path)
        return
    for entry in sorted(local_dir.iterdir()):
        if entry.name in exclude:
            continue
        if entry.is_dir():
            c.log_artifacts(run_id, str(entry), f"{artifact_path}/{entry.name}")
        else:
            c.log_artifact(run_id, str(entry), artifact_path)


def log_dataset_input(c, run_id: str, *, name: str, digest: str, source_type: str, source: str,
                      schema: str | None = None, profile: str | None = None, context: str = "training") -> None:
    """Record a data set the run used as an MLflow dataset input (what ``mlflow.log_input`` does),
    tagged ``mlflow.data.context`` = ``context``. The digest is cut to MLflow's 36 characters."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=name[:500], digest=digest[:36], source_type=source_type[:36], source=source,
                      schema=schema, profile=profile)
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


class ChampionMoved(RegistryError):
    """``champion`` no longer points where the caller read it (another writer moved it):
    the move is refused. Not retryable: the decision was made on a state that is gone."""

    retryable = False


def set_champion(c, model_name: str, version: str, *, reason: str, actor: str, action: str,
                 expected: str | None) -> dict[str, Any]:
    """Point ``champion`` at ``version`` by a person's decision (``promote_model``,
    ``rollback_model``), recording who, why and when on the version.

    A compare-and-set: the alias moves only if it still points at ``expected``
    (``None``: there is no champion). Callers hold
    :func:`nightshift.champion.champion_lock`, which makes the read and the write
    one step for every writer that shares the artifact root.

    :raises RegistryError: the version does not exist, or the registry fails.
    :raises ChampionMoved: champion is not ``expected`` (nothing written).
    :raises ValueError: no reason given (a forced move must say why).
    """
    import datetime as _dt

    from mlflow.exceptions import MlflowException

    if not str(reason or "").strip():
        raise ValueError(f"{action}: a reason is required to move champion by hand")
    try:
        c.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if is_not_found(exc):
            raise RegistryError(f"{model_name} has no version {version}: nothing to {action}") from exc
        raise _registry_error(f"reading v{version}", model_name, exc) from exc
    before = get_champion(c, model_name)
    previous = before["version"] if before else None
    expected = None if expected in (None, "", "none") else str(expected).lstrip("v")
    if previous != expected:
        raise ChampionMoved(f"champion of {model_name} is v{previous} now, not v{expected} as read before this "
                            f"{action} to v{version}: another writer moved it meanwhile; nothing was changed. "
                            "Look at the promotion history and decide again.")
    if previous != str(version):
        c.set_registered_model_alias(model_name, CHAMPION, str(version))
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat()
    for k, v in {f"{TAG_PREFIX}{action}_by": actor, f"{TAG_PREFIX}{action}_reason": reason[:4900],
                 f"{TAG_PREFIX}{action}_at": stamp, f"{TAG_PREFIX}{action}_from": str(previous or "none")}.items():
        c.set_model_version_tag(model_name, str(version), k, v)
    return {"model_name": model_name, "version": str(version), "previous_champion": previous,
            "champion": str(version), "moved": previous != str(version), "actor": actor, "reason": reason,
            "action": action, "time": stamp}


def rollback_target(c, model_name: str, history: list[dict[str, Any]], target: str | None) -> str:
    """The version ``rollback_model`` goes back to: ``target``, or with ``previous`` /
    empty, the champion before the current one according to the promotion history.

    A rollback always moves: the target is never today's champion. For
    ``previous`` only forward moves count (``promoted``, ``forced``) whose
    previous champion differs from the champion they set (forcing the champion
    onto itself, e.g. to redeploy it, records no earlier version), so a second
    ``previous`` goes further back and never brings back the version rolled back from.

    :raises ConfigError: no champion, the target is the champion, or no earlier champion is recorded.
    """
    from nightshift.errors import ConfigError

    current = get_champion(c, model_name)
    if current is None:
        raise ConfigError(f"{model_name} has no champion: there is nothing to roll back")
    cur = current["version"]
    if target not in (None, "", "previous"):
        version = str(target).strip().lstrip("v")
        if version == cur:
            raise ConfigError(f"rollback target v{version} is the current champion of {model_name} (v{cur}): a "
                              "rollback must move champion; give an older version, or 'previous'")
        return version
    for event in reversed(history):
        before, after = str(event.get("previous_champion")), str(event.get("champion"))
        if after == cur and event.get("action") in ("promoted", "forced") \
                and event.get("previous_champion") not in (None, "", "none") and before != after:
            return before
    raise ConfigError(f"the promotion history of {model_name} records no champion before v{cur} (other than "
                      f"v{cur} itself): give the target version explicitly")


def approve_candidate(c, model_name: str, version: str, *, approved: bool, actor: str, comment: str = "",
                      expected_champion: str | None = None) -> dict[str, Any]:
    """Record a person's answer on a version awaiting approval; on approval move
    ``champion`` (only from ``expected_champion``, the champion the gates compared with)."""
    import datetime as _dt

    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat()
    for k, v in {"approved_by": actor, "approval_comment": comment[:4900] or "-", "approved_at": stamp,
                 "approval": "approved" if approved else "rejected", "awaiting_approval": "false"}.items():
        c.set_model_version_tag(model_name, str(version), f"{TAG_PREFIX}{k}", v)
    if not approved:
        current = get_champion(c, model_name)
        return {"version": str(version), "promoted": False, "champion": current["version"] if current else None,
                "note": f"rejected by {actor}: {comment}"}
    champion, note = _move_champion(c, model_name, str(version), expected_champion)
    return {"version": str(version), "promoted": champion == str(version), "champion": champion,
            "note": f"approved by {actor}; {note}"}
