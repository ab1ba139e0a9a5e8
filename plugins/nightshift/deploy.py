"""Serve the champion: blue/green on the local Docker host (Kubernetes manifests: :mod:`nightshift.kubernetes`).

No Airflow here; :mod:`docker` and :mod:`requests` are imported where used.

**Local Docker** (:class:`LocalDeployer`). A small proxy container
(``include/deploy/tcp_proxy.py`` on the inference base image) listens on a
stable port on 127.0.0.1 and forwards every new connection to the backend
named in its upstream file. A deploy starts the new ("green") container on a
free port through :func:`nightshift.containers.run_serving_container` (the
same function system evaluation uses: request log, limits, environment), waits
until ``/v2/health/ready`` answers and the model it reports is the expected
version, rewrites the upstream file (atomically: new connections go to green
at once), checks the answer through the stable port, records the state, then
stops the old ("blue") container gracefully (SIGTERM: it drains in-flight
requests). If green does not become ready, it is removed, blue keeps serving
and the error says why, with green's log. Deploying what already serves is a no-op.

**gRPC.** With a stable gRPC port (:func:`grpc_port_for`: the REST port + 1 by
default, as Triton pairs 8000/8001; ``NIGHTSHIFT_DEPLOY_GRPC=off`` turns it off)
green also serves the OIP gRPC service on a free port of its own, the proxy
forwards the stable gRPC port to it, and the switch and the check through the
proxy cover both protocols.

Every deploy runs inside the model's champion lock
(:func:`nightshift.champion.champion_lock`): one writer at a time moves the
port, and it removes any serving container of this deployment that the state
does not name (left by a deploy killed midway), so nothing is orphaned. Which
version to serve is :func:`nightshift.champion.reconcile`'s business (the
registry's champion *now*), not the caller's.

**Where its state lives.** The deployment state (``deployments/<model>/state.json``, what
serves now) is shared: the Nightshift view, image retention and the drift monitor read it
from other workers, so it goes through the artifact store
(:func:`nightshift.state.write_deployment`), and the lock is the store's. The deploy
host's own files stay in its working copy (:attr:`LocalDeployer.root`): the proxy's upstream
file and the serving container's request log are bind mounts of that host's Docker daemon,
and only deploy, which runs on that host's queue (``NIGHTSHIFT_DOCKER_QUEUE``), touches them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nightshift import contracts, state
from nightshift.artifacts import atomic_write_text
from nightshift.champion import DEFAULT_LOCK_TIMEOUT_S, champion_lock
from nightshift.containers import (DEPLOYMENT_LABEL, LOOPBACK, MODEL_LABEL, ROLE_LABEL,
                                   VERSION_LABEL, ServingConfig, free_port, free_ports, run_serving_container,
                                   wait_ready)
from nightshift.errors import ConfigError, ServingError
from nightshift.store import as_store

if TYPE_CHECKING:
    from nightshift.store import Store

log = logging.getLogger(__name__)

PROXY_SCRIPT = Path(__file__).resolve().parents[2] / "include" / "deploy" / "tcp_proxy.py"


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    import requests

    with requests.Session() as http:
        http.trust_env = False  # loopback only, never through a proxy
        r = http.get(url, timeout=timeout, headers={"Connection": "close"})
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


#: ``NIGHTSHIFT_DEPLOY_GRPC``: ``auto`` (default: the stable gRPC port is the REST port + 1) or ``off``.
DEPLOY_GRPC_ENV = "NIGHTSHIFT_DEPLOY_GRPC"


def grpc_port_for(port: int, env: Any = None) -> int | None:
    """The stable gRPC port that goes with the stable REST ``port``: ``port + 1`` (Triton's
    8000/8001 pairing), or ``None`` when ``NIGHTSHIFT_DEPLOY_GRPC=off``. Every deploy of a model
    (nightly, promote, rollback) derives it here, so the proxy and the served container agree.

    :raises ConfigError: the variable is neither ``auto`` nor ``off``, or ``port`` is the last port.
    """
    raw = str((os.environ if env is None else env).get(DEPLOY_GRPC_ENV, "auto")).strip().lower() or "auto"
    if raw in ("off", "0", "false", "no"):
        return None
    if raw not in ("auto", "on", "1", "true", "yes"):
        raise ConfigError(f"{DEPLOY_GRPC_ENV}={raw!r}: expected 'auto' (the REST port + 1) or 'off'")
    if not 0 < int(port) < 65535:
        raise ConfigError(f"deploy port {port}: its gRPC port ({int(port) + 1}) is not a TCP port; "
                          f"choose another deploy port or set {DEPLOY_GRPC_ENV}=off")
    return int(port) + 1


def _proxy_env(c: Any, key: str) -> int | None:
    """An integer setting of a proxy container (``LISTEN_PORT``, ``GRPC_LISTEN_PORT``), or None when unset."""
    try:
        env = (c.attrs.get("Config") or {}).get("Env") or []
    except AttributeError:
        return None
    for item in env:
        if isinstance(item, str) and item.startswith(f"{key}="):
            try:
                return int(item.split("=", 1)[1]) or None
            except ValueError:
                return None
    return None


def _proxy_port(c: Any) -> int | None:
    """The port a proxy container listens on (its ``LISTEN_PORT``), or None when it cannot be told."""
    return _proxy_env(c, "LISTEN_PORT")


def _grpc_serves(target: str, model_name: str, model_version: str | None, timeout_s: float = 2.0) -> str | None:
    """Why ``target`` (``host:port``) does not serve ``model_name`` (and ``model_version``) over
    OIP gRPC, or ``None`` when it does: ServerReady, then ModelMetadata's versions."""
    import grpc

    from nightshift.serving import grpc_predict_v2_pb2 as pb
    from nightshift.serving import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if not stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s).ready:
                return "ServerReady: not ready"
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model_name), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    if model_version is not None and model_version not in list(meta.versions):
        return f"ModelMetadata: versions {list(meta.versions)}, not {model_version}"
    return None


class LocalDeployer:
    """Blue/green deployment of one model's inference image on the local Docker host.

    :param docker_client: a ``docker.DockerClient``.
    :param model_name: the served model name (OIP ``/v2/models/<name>``).
    :param artifact_root: the artifact store (or a local root folder): the deployment state and the
        lock go through it; the proxy config and the request log live in its working copy
        (:attr:`root`) on this Docker host.
    :param port: the stable port on 127.0.0.1 clients use.
    :param proxy_image: image with ``python3`` to run the proxy (the inference base image).
    :param ready_timeout_s: how long green may take to become ready.
    :param drain_timeout_s: how long blue may take to finish in-flight requests on SIGTERM.
    :param switch_grace_s: how long blue keeps running after traffic moved, before SIGTERM: a
        connection the proxy opened to blue just before the switch may still wait in blue's
        accept queue, and a server that stops listening resets it (Kubernetes' preStop sleep).
    :param config: how the serving container runs (memory limit, request-log sampling,
        environment); ``ServingConfig.from_env()`` in the operators, the deployed default here.
    :param lock_timeout_s: how long a deploy waits for another writer's champion lock.
    :param grpc_port: the stable OIP gRPC port on 127.0.0.1 (:func:`grpc_port_for`); ``None``: REST only.
    :param hook: test/tracing hook, called with ``green_started``, ``before_switch`` and
        ``before_record`` as a deploy passes those points.
    """

    def __init__(self, docker_client: Any, *, model_name: str, artifact_root: str | Path | Store, port: int = 8600,
                 proxy_image: str = "nightshift/base:bookworm", ready_timeout_s: float = 60.0,
                 drain_timeout_s: int = 20, switch_grace_s: float = 1.0, config: ServingConfig | None = None,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, hook: Callable[[str], None] | None = None,
                 grpc_port: int | None = None):
        if not 0 < int(port) < 65536:
            raise ConfigError(f"deploy port must be 1..65535, got {port}")
        if grpc_port is not None and (not 0 < int(grpc_port) < 65536 or int(grpc_port) == int(port)):
            raise ConfigError(f"deploy gRPC port must be 1..65535 and not the REST port {port}, got {grpc_port}")
        self.grpc_port = None if grpc_port is None else int(grpc_port)
        self.client = docker_client
        self.model_name = model_name
        self.store = as_store(artifact_root)
        #: this Docker host's working copy: the proxy config and the request log (bind mounts)
        self.root = self.store.local_root
        self.port = int(port)
        self.proxy_image = proxy_image
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.switch_grace_s = float(switch_grace_s)
        self.config = config or ServingConfig()
        self.lock_timeout_s = lock_timeout_s
        self.hook = hook
        self.state_path = contracts.deployment_path(self.root, model_name)
        self.proxy_dir = self.state_path.parent / "proxy"
        self.log_dir = contracts.request_log_dir(self.root, model_name)
        #: labels this deployment's serving containers carry (what a deploy may sweep)
        self.deployment_id = hashlib.sha256(self.store.to_uri(self.state_path.absolute()).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ state

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        """``127.0.0.1:<stable gRPC port>`` for a gRPC client (``tritonclient.grpc``), or None."""
        return None if self.grpc_port is None else f"{LOOPBACK}:{self.grpc_port}"

    def state(self) -> dict[str, Any] | None:
        """What serves now, as the store records it (:func:`nightshift.state.read_deployment`)."""
        return state.read_deployment(self.store, self.model_name)

    def _hook(self, point: str) -> None:
        if self.hook is not None:
            self.hook(point)

    def _lock(self, purpose: str):
        return champion_lock(self.store, self.model_name, timeout_s=self.lock_timeout_s, purpose=purpose)

    def _container(self, name: str | None):
        from docker.errors import NotFound

        if not name:
            return None
        try:
            return self.client.containers.get(name)
        except NotFound:
            return None

    def serving_containers(self) -> list[Any]:
        """The serving containers of this deployment (running or not)."""
        return self.client.containers.list(all=True, filters={"label": [f"{DEPLOYMENT_LABEL}={self.deployment_id}",
                                                                         f"{ROLE_LABEL}=serving"]})

    # ------------------------------------------------------------------ proxy

    def _ensure_proxy(self) -> None:
        name = f"nightshift-proxy-{self.model_name}"
        c = self._container(name)
        listens, listens_grpc = _proxy_port(c), _proxy_env(c, "GRPC_LISTEN_PORT")
        same = listens in (None, self.port) and listens_grpc == self.grpc_port
        if c is not None and c.status == "running" and same:
            return
        if c is not None:
            if not same:  # the model's stable ports moved: one proxy per model
                log.warning("the proxy of %s listens on %s:%s (gRPC %s), not on the deploy ports %s (gRPC %s): "
                            "replacing it", self.model_name, LOOPBACK, listens, listens_grpc, self.port, self.grpc_port)
            c.remove(force=True)
        if not PROXY_SCRIPT.is_file():
            raise ConfigError(f"the deploy proxy script {PROXY_SCRIPT} is missing from this installation")
        for port in (self.port, self.grpc_port):
            if port is None:
                continue
            with socket.socket() as s:
                # as the proxy binds: connections of a proxy just replaced (TIME_WAIT) do not count
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((LOOPBACK, port))
                except OSError as exc:
                    what = "stable port" if port == self.port else f"stable gRPC port ({DEPLOY_GRPC_ENV})"
                    raise ServingError(f"the {what} {LOOPBACK}:{port} is taken by another program ({exc}); "
                                       "choose another deploy port") from exc
        log.info("starting proxy %s on %s%s", name, self.url, f" and gRPC {self.grpc_target}" if self.grpc_port else "")
        grpc_env = {"GRPC_LISTEN_PORT": str(self.grpc_port),
                    "GRPC_UPSTREAM_FILE": "/etc/nightshift-proxy/upstream-grpc"} if self.grpc_port else {}
        self.client.containers.run(
            self.proxy_image, ["python3", "/opt/nightshift-proxy/tcp_proxy.py"], name=name, detach=True,
            network_mode="host", user="65534:65534", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            restart_policy={"Name": "unless-stopped"}, mem_limit="128m",
            environment={"LISTEN_HOST": LOOPBACK, "LISTEN_PORT": str(self.port),
                         "UPSTREAM_FILE": "/etc/nightshift-proxy/upstream", "PYTHONUNBUFFERED": "1", **grpc_env},
            volumes={str(PROXY_SCRIPT.parent): {"bind": "/opt/nightshift-proxy", "mode": "ro"},
                     str(self.proxy_dir): {"bind": "/etc/nightshift-proxy", "mode": "ro"}},
            labels={ROLE_LABEL: "proxy", MODEL_LABEL: self.model_name, DEPLOYMENT_LABEL: self.deployment_id})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listening = []
            for port in (self.port, self.grpc_port):
                if port is not None:
                    with socket.socket() as s:
                        listening.append(s.connect_ex((LOOPBACK, port)) == 0)
            if all(listening):
                return
            time.sleep(0.1)
        c = self._container(name)
        raise ServingError(f"the deploy proxy did not start listening on {self.url}",
                           logs=c.logs(tail=50).decode("utf-8", "replace") if c else "")

    def _switch(self, port: int, grpc_port: int | None = None) -> None:
        """Point new connections at ``port`` (and the stable gRPC port's at ``grpc_port``): each
        upstream file is replaced atomically; gRPC first, so REST never leads onto a backend whose
        gRPC side is not routed yet."""
        self.proxy_dir.mkdir(parents=True, exist_ok=True)
        files = [("upstream-grpc", grpc_port)] if grpc_port else []
        for name, p in [*files, ("upstream", port)]:
            atomic_write_text(self.proxy_dir / name, f"{LOOPBACK}:{p}\n")
            os.chmod(self.proxy_dir / name, 0o644)
        os.chmod(self.proxy_dir, 0o755)

    def upstream_port(self) -> int | None:
        """The backend port the proxy forwards new connections to, per its upstream file."""
        try:
            return int((self.proxy_dir / "upstream").read_text().strip().rsplit(":", 1)[1])
        except (OSError, ValueError, IndexError):
            return None

    # ------------------------------------------------------------------ deploy

    def _wait_ready(self, container, port: int, expect_version: str | None) -> str:
        """Green answers ready and reports ``expect_version`` (:func:`nightshift.containers.wait_ready`)."""
        _, version = wait_ready(container, f"http://{LOOPBACK}:{port}", timeout_s=self.ready_timeout_s,
                                model_name=self.model_name, expect_version=expect_version)
        return version or ""

    def _serves(self, model_version: str | None) -> bool:
        """The stable port answers ready and reports ``model_version`` (when given)."""
        try:
            code, _ = _get(f"{self.url}/v2/health/ready")
            if code != 200:
                return False
            if model_version is None:
                return True
            code, meta = _get(f"{self.url}/v2/models/{self.model_name}")
            return code == 200 and isinstance(meta, dict) and model_version in meta.get("versions", [])
        except Exception:  # noqa: BLE001 - not serving
            return False

    def deploy(self, image: str, *, registry_version: str, model_version: str | None = None,
               reason: str = "") -> dict[str, Any]:
        """Serve ``image`` on the stable port, blue/green, inside the model's champion lock.
        Returns the new state.

        :param registry_version: the registered model version (recorded, labelled).
        :param model_version: the version the server must report for the model
            (its ``model.json`` version); checked before traffic moves.
        :raises ServingError: green did not become ready (blue keeps serving).
        """
        with self._lock(f"deploy v{registry_version}: {reason}"):
            return self._deploy(image, registry_version=str(registry_version), model_version=model_version,
                                reason=reason)

    def _deploy(self, image: str, *, registry_version: str, model_version: str | None, reason: str) -> dict[str, Any]:
        from docker.errors import APIError, ImageNotFound

        current = self.state()
        try:
            image_id = self.client.images.get(image).id
        except ImageNotFound:
            raise ServingError(f"image {image} is not in the local Docker daemon: build it first "
                               "(nightly_retrain's build_inference_image)") from None
        blue = self._container((current or {}).get("container"))
        if current and blue is not None and blue.status == "running":
            # a deploy killed between its switch and its record left the proxy on an unrecorded
            # container: traffic goes back to what the state names before that container is removed
            if self.upstream_port() != int(current["port"]):
                log.warning("the proxy pointed at port %s, not at the recorded %s: switching back",
                            self.upstream_port(), current["port"])
                self._switch(int(current["port"]), current.get("backend_grpc_port"))
        self._sweep(keep=blue.name if blue is not None else None)
        self._remove_drained_leftover(current)
        if current and blue is not None and blue.status == "running" and current.get("image_id") == image_id \
                and str(current.get("registry_version")) == registry_version \
                and current.get("grpc_port") == self.grpc_port and self._serves(model_version):
            log.info("%s v%s (%s) already serves on %s: nothing to do", self.model_name, registry_version,
                     image, self.url)
            return {**current, "changed": False}

        port, grpc_backend = free_ports(2) if self.grpc_port else (free_port(), None)
        name = f"nightshift-serve-{self.model_name}-v{registry_version}-{uuid.uuid4().hex[:6]}"
        log.info("green: %s from %s on port %d%s", name, image, port, f" (gRPC {grpc_backend})" if grpc_backend else "")
        try:
            green = run_serving_container(
                self.client, image, name=name, port=port, config=self.config, request_log_dir=self.log_dir,
                grpc_port=grpc_backend,
                restart=True, labels={ROLE_LABEL: "serving", MODEL_LABEL: self.model_name,
                                      VERSION_LABEL: registry_version, DEPLOYMENT_LABEL: self.deployment_id})
        except APIError as exc:
            raise ServingError(f"could not start {name} from {image}: {exc}; the current deployment keeps serving") \
                from exc
        try:
            self._hook("green_started")
            served_version = self._wait_ready(green, port, model_version)
            self._hook("before_switch")
            self._switch(port, grpc_backend)
            self._ensure_proxy()
            self._check_through_proxy(model_version)
        except BaseException as exc:
            logs = green.logs(tail=80).decode("utf-8", "replace")
            green.remove(force=True)
            if current and blue is not None:
                self._switch(int(current["port"]), current.get("backend_grpc_port"))  # traffic stays on blue
            if isinstance(exc, ServingError):
                kept = f"v{current['registry_version']} keeps serving" if current else "nothing was serving"
                raise ServingError(f"deploy of {self.model_name} v{registry_version} failed: {exc}. {kept}.",
                                   logs=exc.logs or logs) from exc
            raise
        self._hook("before_record")
        record = {"model": self.model_name, "registry_version": registry_version,
                 "model_version": served_version, "image": image, "image_id": image_id, "container": name,
                 "port": port, "url": self.url, "status": "serving", "target": "docker",
                 "grpc_port": self.grpc_port, "grpc_target": self.grpc_target, "backend_grpc_port": grpc_backend,
                 "since": datetime.now(timezone.utc).isoformat(), "request_log_dir": str(self.log_dir),
                 "previous": {k: current.get(k) for k in ("registry_version", "image", "container")} if current else None,
                 "reason": reason}
        # traffic has moved: record it before blue drains (up to drain_timeout_s), so a task
        # killed meanwhile leaves a state that names what serves
        state.write_deployment(self.store, self.model_name, record)
        if blue is not None and blue.id != green.id:
            log.info("blue: stopping %s in %.1fs (drains up to %ss)", blue.name, self.switch_grace_s,
                     self.drain_timeout_s)
            time.sleep(self.switch_grace_s)  # connections accepted by blue's kernel before the switch
            try:
                blue.stop(timeout=self.drain_timeout_s)
                blue.remove(force=True)
            except APIError as exc:
                log.warning("could not remove the old container %s: %s", blue.name, exc)
        return {**record, "changed": True}

    def _sweep(self, keep: str | None) -> None:
        """Remove this deployment's serving containers other than ``keep`` (what the state
        names): greens and blues of deploys killed midway. Only ever called under the lock,
        so no other deploy of this port is in flight."""
        for c in self.serving_containers():
            if c.name != keep:
                log.warning("removing %s: a serving container of %s that the deployment state does not name "
                            "(left by a deploy that stopped midway)", c.name, self.model_name)
                try:
                    c.remove(force=True)
                except Exception as exc:  # noqa: BLE001 - best effort; the deploy goes on
                    log.warning("could not remove %s: %s", c.name, exc)

    def _remove_drained_leftover(self, current: dict[str, Any] | None) -> None:
        """Remove the container the last deploy was draining when its task died: the state
        already names its successor (traffic had moved), so nothing else would. (Containers
        started before deployments were labelled are found by name here, not by :meth:`_sweep`.)"""
        prev = self._container(((current or {}).get("previous") or {}).get("container"))
        if prev is not None and prev.name != (current or {}).get("container"):
            log.warning("removing %s: the deploy that replaced it stopped before it could", prev.name)
            try:
                prev.remove(force=True)
            except Exception as exc:  # noqa: BLE001 - best effort; the deploy goes on
                log.warning("could not remove %s: %s", prev.name, exc)

    def _check_through_proxy(self, model_version: str | None) -> None:
        """Both stable ports serve ``model_version`` (REST, then gRPC when there is a gRPC port)."""
        deadline = time.monotonic() + 10
        last = ""
        rest_ok = False
        while time.monotonic() < deadline:
            try:
                if not rest_ok:
                    code, meta = _get(f"{self.url}/v2/models/{self.model_name}")
                    rest_ok = code == 200 and (model_version is None or model_version in meta.get("versions", []))
                    last = "" if rest_ok else f"{code}: {meta}"
                if rest_ok:
                    if self.grpc_target is None:
                        return
                    why = _grpc_serves(self.grpc_target, self.model_name, model_version)
                    if why is None:
                        return
                    last = f"gRPC {self.grpc_target}: {why}"
            except Exception as exc:  # noqa: BLE001
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        where = self.url + (f" (gRPC {self.grpc_target})" if self.grpc_port else "")
        raise ServingError(f"the stable port {where} does not serve the new version after the switch (last: {last})")

    def undeploy(self) -> None:
        """Remove this deployment's serving containers and the model's proxy (tests, decommissioning)."""
        with self._lock("undeploy"):
            current = self.state() or {}
            names = {f"nightshift-proxy-{self.model_name}", current.get("container"),
                     (current.get("previous") or {}).get("container")}
            for c in [*self.serving_containers(), *(self._container(n) for n in names if n)]:
                if c is not None:
                    try:
                        c.remove(force=True)
                    except Exception as exc:  # noqa: BLE001 - listed twice, or already gone
                        log.debug("could not remove %s: %s", c.name, exc)
            state.clear_deployment(self.store, self.model_name)


__all__ = ["DEPLOY_GRPC_ENV", "LocalDeployer", "grpc_port_for"]
