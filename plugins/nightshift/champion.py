"""One writer for ``champion`` and the serving port: a per-model critical section.

Every move of the registry's ``champion`` alias and every change of what the
stable port serves goes through :func:`champion_lock`, one lock per model
under the artifact root. Inside it:

* :func:`reconcile` (``deploy`` of nightly_retrain, promote_model and
  rollback_model alike) reads the champion *now* and makes the port serve it.
  Running it twice, or after another run moved the champion, converges.
* :func:`change_champion` (``promote_model``, ``rollback_model``) resolves the
  target (for a rollback from the promotion history, read under the lock),
  checks that it can be deployed, makes the port serve it, then moves the
  alias with a compare-and-set (:func:`nightshift.registry.set_champion`
  with ``expected``) and records the move in the promotion history. A target
  that cannot be deployed moves nothing.

**The lock** is the artifact store's lock on ``locks/champion/<model>.lock``
(:meth:`nightshift.store.Store.lock`): with a local root an ``fcntl.flock`` of
that file, which the kernel releases when its holder's process dies (a killed
task, a SIGKILLed worker); with an ``s3://`` root a lease object that its holder
renews and that another writer takes over once it expired (a killed holder's
lease lapses after ``S3Store.LEASE_S``), so the workers that share no folder
are serialised too. It is reentrant within one thread (the deployer takes it
too, so a direct ``LocalDeployer.deploy`` is serialised as well). Whatever the
lock, the compare-and-set on the alias still refuses a stale move.

No Airflow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nightshift.errors import ConfigError
from nightshift.locks import LockTimeout

if TYPE_CHECKING:
    from nightshift.store import Store

log = logging.getLogger(__name__)

#: How long a writer waits for another one (a deploy: green's ready timeout + blue's drain).
DEFAULT_LOCK_TIMEOUT_S = 600.0
#: The manual moves of ``champion`` (history action -> DAG).
ACTIONS = {"forced": "promote_model", "rolled_back": "rollback_model"}
#: Deploy targets: ``docker`` (the stable port on this host), ``kubernetes`` (manifests), ``none``.
DEPLOY_TARGETS = ("docker", "kubernetes", "none")

Hook = Callable[[str], None]


class ChampionLockTimeout(LockTimeout):
    """Another writer held the model's champion lock for longer than the timeout.
    Retryable: the holder finishes (or dies, and the kernel releases its lock)."""

    retryable = True


# --------------------------------------------------------------------------- the lock

_held = threading.local()  # lock URI -> depth, per thread (reentrancy)


def lock_rel(model_name: str) -> str:
    """The champion lock of ``model_name`` relative to the artifact root (one per model;
    distinct names give distinct locks)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model_name)).strip(".") or "_"
    if safe != model_name:  # keep the mapping injective
        safe = f"{safe}-{hashlib.sha256(str(model_name).encode()).hexdigest()[:12]}"
    return f"locks/champion/{safe}.lock"


def lock_path(artifact_root: str | os.PathLike, model_name: str) -> Path:
    """The lock file of ``model_name`` under a local root."""
    return Path(artifact_root) / lock_rel(model_name)


@contextmanager
def champion_lock(store: str | os.PathLike | Store, model_name: str, *,
                  timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, purpose: str = "",
                  on_wait: Callable[[], None] | None = None) -> Iterator[Path | str]:
    """Hold the per-model critical section for every writer of ``champion`` and of the
    stable port: ``with champion_lock(store, "digits", timeout_s=600): ...``.

    Reentrant within a thread; other threads, processes and workers sharing the store wait.
    Released when the block ends or, if the holder dies, by the kernel (a local root) or when
    its lease expires (an object store, :meth:`nightshift.store.Store.lock`).

    :param store: the artifact store (or a local root folder).
    :param purpose: recorded in the lock, quoted to a writer that waits.
    :param on_wait: called once when the lock is busy and this writer starts waiting.
    :raises ChampionLockTimeout: not acquired within ``timeout_s``; names the holder.
    :yields: the lock's path (local root) or URI (object store).
    """
    from nightshift.store import as_store

    store = as_store(store)
    rel = lock_rel(model_name)
    key = f"{store.uri.rstrip('/')}/{rel}" if store.remote else str((store.local_root / rel).resolve())
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    if depth.get(key):
        depth[key] += 1
        try:
            yield key if store.remote else store.local_root / rel
        finally:
            depth[key] -= 1
        return
    with store.lock(rel, timeout_s=timeout_s, purpose=purpose, what=f"the champion lock of {model_name!r}",
                    hint="Another deploy, promote_model or rollback_model is moving champion or the serving port; "
                         "nothing was changed by this one.", error=ChampionLockTimeout, on_wait=on_wait) as held:
        depth[key] = 1
        try:
            yield held
        finally:
            depth.pop(key, None)


def _hook(hook: Hook | None, point: str) -> None:
    if hook is not None:
        hook(point)


# --------------------------------------------------------------------------- what can be deployed


@dataclass(frozen=True)
class DeployTarget:
    """A model version that can be served: its image and the digest its server reports."""

    model_name: str
    version: str
    image: str | None
    onnx_sha256: str

    @property
    def served_version(self) -> str:
        """The version the server reports for the model (its ``model.json`` version)."""
        return self.onnx_sha256[:12]


def deploy_target(c, model_name: str, version: str, *, target: str = "docker", docker_client: Any = None,
                  tags: dict[str, str] | None = None) -> DeployTarget:
    """Check that ``version`` can be served with ``target`` and say what to serve.

    The version must exist and carry its ONNX digest; for ``docker`` and
    ``kubernetes`` an image tag; for ``docker`` that image must be in the local
    Docker daemon (retention may have removed it) and, where the version records
    the image id, be that build.

    :param tags: the version's tags when already read (skips the registry call).
    :raises ConfigError: it cannot be served; the message names the version and what is missing.
    """
    from nightshift import contracts, registry

    if target not in DEPLOY_TARGETS:
        raise ConfigError(f"deploy target must be one of {list(DEPLOY_TARGETS)}, got {target!r}")
    version = str(version).lstrip("v")
    if tags is None:
        from mlflow.exceptions import MlflowException

        try:
            tags = dict(c.get_model_version(model_name, version).tags)
        except MlflowException as exc:
            if registry.is_not_found(exc):
                raise ConfigError(f"{model_name} has no version {version}: nothing to deploy") from exc
            raise registry._registry_error(f"reading v{version}", model_name, exc) from exc
    onnx_sha = tags.get(contracts.tag(contracts.VersionTag.ONNX_SHA256), "")
    if not onnx_sha:
        raise ConfigError(f"{model_name} v{version} has no {contracts.tag('onnx_sha256')} tag: what it serves "
                          "cannot be checked before traffic moves to it")
    image = tags.get(contracts.tag(contracts.VersionTag.IMAGE)) or None
    if target != "none" and not image:
        raise ConfigError(f"{model_name} v{version} has no {contracts.tag('image')} tag: there is no image to deploy")
    if target == "docker":
        if docker_client is None:
            raise ConfigError("deploy target 'docker' needs a Docker client to check the image")
        from docker.errors import ImageNotFound

        try:
            local = docker_client.images.get(image)
        except ImageNotFound:
            raise ConfigError(f"the image of {model_name} v{version}, {image}, is not in the local Docker daemon "
                              "(image retention may have removed it): rebuild it or choose another version. "
                              "Nothing was moved.") from None
        want_id = tags.get(contracts.tag(contracts.VersionTag.IMAGE_ID))
        if want_id and local.id != want_id:
            raise ConfigError(f"{image} in the local Docker daemon is {local.id}, not the build {want_id} that "
                              f"{model_name} v{version} recorded: refusing to serve another build. Nothing was moved.")
    return DeployTarget(model_name=model_name, version=version, image=image, onnx_sha256=onnx_sha)


# --------------------------------------------------------------------------- reconcile


def _deploy_locked(c, deployer: Any, target: DeployTarget, *, reason: str) -> dict[str, Any]:
    state = deployer.deploy(target.image, registry_version=target.version, model_version=target.served_version,
                            reason=reason)
    return {**state, "model_name": target.model_name, "version": target.version}


def reconcile(c, deployer: Any, *, reason: str, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
              hook: Hook | None = None) -> dict[str, Any]:
    """Make ``deployer``'s stable port serve the registry's champion *now*.

    Under :func:`champion_lock`: read the champion, check it can be deployed,
    deploy it (a no-op when it already serves). Whatever version a run
    recorded, what serves afterwards is what the registry says.

    :param deployer: a :class:`nightshift.deploy.LocalDeployer` (``model_name``,
        ``store``, ``client``, ``deploy``).
    :param hook: test/tracing hook, called with ``lock_wait`` and ``champion_read``.
    :raises ConfigError: no champion, or it cannot be deployed.
    :raises ServingError: its container did not become ready (what served keeps serving).
    """
    from nightshift import registry

    name = deployer.model_name
    with champion_lock(deployer.store, name, timeout_s=lock_timeout_s, purpose=f"deploy: {reason}",
                       on_wait=lambda: _hook(hook, "lock_wait")):
        champ = registry.get_champion(c, name)
        _hook(hook, "champion_read")
        if champ is None:
            raise ConfigError(f"{name} has no champion in the registry: nothing to deploy")
        target = deploy_target(c, name, champ["version"], target="docker", docker_client=deployer.client,
                               tags=champ["tags"])
        return _deploy_locked(c, deployer, target, reason=reason)


def change_champion(c, *, model_name: str, artifact_root: str | os.PathLike | Store, version: str | None, action: str,
                    reason: str, actor: str, deploy: str = "docker", deployer: Any = None,
                    dag_id: str | None = None, run_id: str | None = None,
                    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, hook: Hook | None = None) -> dict[str, Any]:
    """Move ``champion`` by a person's decision and make the port serve it, in one critical section.

    :param artifact_root: the artifact store (or a local root): the lock and the promotion history.
    :param version: the version to make champion; for ``rolled_back``, ``None`` /
        ``previous`` means the champion before the current one (from the promotion
        history, read under the lock; see :func:`nightshift.registry.rollback_target`).
    :param action: ``forced`` (promote_model) or ``rolled_back`` (rollback_model).
    :param deploy: ``docker`` (``deployer`` serves it on the stable port before the
        alias moves), ``kubernetes`` (the image tag must exist; the deploy task
        renders manifests) or ``none`` (the alias only).
    :param dag_id, run_id: recorded in the history; a retry of the same run whose
        move already happened does not move ``champion`` again (it only reconciles).
        The run is also marked on the target version (:func:`run_tag`) before the alias
        moves, so a try that died between the move and its history line is found too.
    :param hook: test/tracing hook (``lock_wait``, ``target_resolved``, ``alias_moved``).
    :raises ConfigError: no reason, no such version, a rollback target equal to the
        champion, or a target that cannot be deployed (nothing moved).
    :raises ServingError: the target did not become ready (nothing moved; what served keeps serving).
    """
    from nightshift import contracts, registry, state
    from nightshift.store import as_store

    if action not in ACTIONS:
        raise ConfigError(f"action must be one of {sorted(ACTIONS)}, got {action!r}")
    if not str(reason or "").strip():
        raise ConfigError(f"{ACTIONS[action]} needs a reason: say why champion moves (it is recorded)")
    if deploy == "docker" and deployer is None:
        raise ConfigError("deploy target 'docker' needs a deployer")
    version = str(version or "").strip() or None
    artifact_root = as_store(artifact_root)
    with champion_lock(artifact_root, model_name, timeout_s=lock_timeout_s, purpose=f"{ACTIONS[action]}: {reason}",
                       on_wait=lambda: _hook(hook, "lock_wait")):
        current = registry.get_champion(c, model_name)
        current_v = current["version"] if current else None
        history = state.read_history(artifact_root, model_name)
        done = _already_done(history, action=action, dag_id=dag_id, run_id=run_id, champion=current_v,
                             requested=None if version in (None, "previous") else version.lstrip("v"),
                             champion_tags=current["tags"] if current else None)
        if done is not None:  # a retry of a run whose move already happened: converge, do not move twice
            log.warning("%s: this run already moved champion of %s to v%s; only reconciling the port",
                        ACTIONS[action], model_name, current_v)
            if done.get("_from_tag"):  # the earlier try died after the alias moved, before its history line
                done = _finish_recording(c, artifact_root, model_name, current_v, done, action=action,
                                         reason=reason, actor=actor, dag_id=dag_id, run_id=run_id)
            out = {"model_name": model_name, "version": current_v, "previous_champion": done.get("previous_champion"),
                   "champion": current_v, "moved": False, "actor": done.get("actor"), "reason": done.get("reason"),
                   "action": action, "time": done.get("time"), "note": "moved by an earlier try of this run"}
            target = deploy_target(c, model_name, current_v, target=deploy,
                                   docker_client=deployer.client if deployer is not None else None)
            if deploy == "docker":
                out["deployment"] = _deploy_locked(c, deployer, target, reason=f"{ACTIONS[action]}: {reason}")
            return {**out, "image": target.image, "promoted": True}
        if action == "rolled_back":
            target_v = registry.rollback_target(c, model_name, history, version)
        elif not version:
            raise ConfigError("promote_model needs the version to make champion")
        else:
            target_v = version.lstrip("v")
        _hook(hook, "target_resolved")
        target = deploy_target(c, model_name, target_v, target=deploy,
                               docker_client=deployer.client if deployer is not None else None)
        deployment = None
        if deploy == "docker":
            # the port moves first: a target that does not become ready moves nothing at all
            deployment = _deploy_locked(c, deployer, target, reason=f"{ACTIONS[action]}: {reason}")
        mark = run_tag(action)
        try:
            if run_id:  # before the alias moves: a retry of this run finds its own move (see _already_done)
                c.set_model_version_tag(model_name, target.version, mark, json.dumps(
                    {"dag_id": dag_id, "run_id": run_id, "from": current_v}, sort_keys=True))
            out = registry.set_champion(c, model_name, target.version, reason=reason, actor=actor, action=action,
                                        expected=current_v)
        except BaseException:
            if run_id:
                try:  # the alias did not move: the mark must not claim it did
                    if (registry.get_champion(c, model_name) or {}).get("version") != target.version:
                        c.delete_model_version_tag(model_name, target.version, mark)
                except Exception as exc:  # noqa: BLE001 - a stale mark only matters if champion later points here
                    log.warning("could not remove %s from %s v%s: %s", mark, model_name, target.version, exc)
            if deploy == "docker":  # the port serves the target but the alias did not move: put it back
                try:
                    reconcile(c, deployer, reason=f"{ACTIONS[action]} failed to move champion: restore", hook=None)
                except Exception as exc:  # noqa: BLE001 - the original error is the one to raise
                    log.error("could not restore what %s serves after a failed champion move: %s", model_name, exc)
            raise
        _hook(hook, "alias_moved")
        state.append_history(artifact_root, contracts.HistoryEvent(
            model=model_name, action=action, version=out["version"], previous_champion=out["previous_champion"],
            champion=out["champion"], reason=str(reason), actor=actor, dag_id=dag_id, run_id=run_id))
        log.warning("%s: champion of %s is now v%s (was v%s), by %s: %s", ACTIONS[action], model_name,
                    out["champion"], out["previous_champion"], actor, reason)
        return {**out, "deployment": deployment, "image": target.image, "promoted": True}


def run_tag(action: str) -> str:
    """The version tag naming the run that moved ``champion`` to it by ``action``
    (``nightshift.rolled_back_run``, ``nightshift.forced_run``): written before the alias moves."""
    from nightshift.contracts import TAG_PREFIX

    return f"{TAG_PREFIX}{action}_run"


def _already_done(history: list[dict[str, Any]], *, action: str, dag_id: str | None, run_id: str | None,
                  champion: str | None, requested: str | None,
                  champion_tags: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The history event this run wrote for this request, when champion still points where it moved it.

    Without one, the champion's :func:`run_tag` naming this run says an earlier try moved the
    alias and died before its history line: returns ``{"_from_tag": True, "previous_champion"}``.
    """
    if not run_id or (requested is not None and requested != champion):
        return None
    for event in reversed(history):
        if event.get("run_id") == run_id and event.get("dag_id") == dag_id and event.get("action") == action:
            return event if str(event.get("champion")) == str(champion) else None
    try:
        mark = json.loads((champion_tags or {}).get(run_tag(action)) or "{}")
    except ValueError:
        return None
    if isinstance(mark, dict) and mark.get("run_id") == run_id and mark.get("dag_id") == dag_id:
        return {"_from_tag": True, "previous_champion": mark.get("from")}
    return None


def _finish_recording(c, artifact_root: Store, model_name: str, version: str, done: dict[str, Any], *,
                      action: str, reason: str, actor: str, dag_id: str | None, run_id: str | None) -> dict[str, Any]:
    """What an earlier try that moved the alias and died left unwritten: the version's
    ``<action>_by/_reason/_at/_from`` tags and the history line (keyed by run: written once)."""
    from nightshift import contracts, state
    previous = done.get("previous_champion")
    stamp = datetime.now(timezone.utc).isoformat()
    for k, v in {f"{action}_by": actor, f"{action}_reason": str(reason)[:4900], f"{action}_at": stamp,
                 f"{action}_from": str(previous or "none")}.items():
        c.set_model_version_tag(model_name, str(version), contracts.tag(k), v)
    state.append_history(artifact_root, contracts.HistoryEvent(
        model=model_name, action=action, version=str(version), previous_champion=previous, champion=str(version),
        reason=str(reason), actor=actor, dag_id=dag_id, run_id=run_id,
        extra={"note": "recorded by a retry: the earlier try moved champion and stopped before recording it"}))
    return {"previous_champion": previous, "actor": actor, "reason": reason, "time": stamp}


__all__ = ["ACTIONS", "DEFAULT_LOCK_TIMEOUT_S", "DEPLOY_TARGETS", "ChampionLockTimeout", "DeployTarget",
           "champion_lock", "change_champion", "deploy_target", "lock_path", "lock_rel", "reconcile", "run_tag"]
