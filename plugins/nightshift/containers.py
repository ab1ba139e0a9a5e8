"""One container runtime for the inference image: the Docker client, the labels, how a
serving container runs, when it is ready, and the sweep of leftovers.

System evaluation (:class:`InferenceContainer`, used by :mod:`nightshift.system_eval`
and the benches) and deployment (:mod:`nightshift.deploy`) both start the inference
image through :func:`serving_run_kwargs` and wait for it with :func:`wait_ready`, so
the gates measure exactly the configuration that serves: the same request log at the
same sampling rate, the same memory and process limits, the same dropped capabilities
and environment. Only the port, the name, the labels and the restart policy differ.
The image build (:mod:`nightshift.inference_image`) gets its client from here too
(:func:`connect_docker`), and so does every operator without a ``docker_conn_id``
(with one, ``nightshift.operators.base.resolve_docker_client`` uses the provider's ``DockerHook``).

No Airflow here; :mod:`docker` and :mod:`requests` are imported where used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nightshift.errors import DockerUnavailable, ServingError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Labels every Nightshift container carries (role: serving / system-eval / proxy).
ROLE_LABEL = "ai.nightshift.role"
MODEL_LABEL = "ai.nightshift.model"
VERSION_LABEL = "ai.nightshift.model.registry_version"
#: The deployment (one stable port's state) a serving container belongs to: what a deploy may sweep.
DEPLOYMENT_LABEL = "ai.nightshift.deployment"
#: Where the serving container writes its request log (a host folder is mounted there).
CONTAINER_LOG_DIR = "/var/log/nightshift/requests"
#: The unprivileged user the inference image runs as (``APP_UID`` in include/inference/Dockerfile).
SERVING_UID = 10001
#: Share of requests the deployed server writes to its request log (what drift_monitor reads).
DEPLOYED_REQUEST_LOG_SAMPLE = 1.0
DEFAULT_MEM_LIMIT = "2g"
PIDS_LIMIT = 512


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the OS picks it; another process could take it first)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (all held open together while the OS
    picks them, so no two are the same; another process could still take one first)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(host: str = LOOPBACK, tries: int = 50) -> int:
    """A port ``p`` with ``p`` and ``p + 1`` both free on ``host`` right now: a deploy's stable
    REST port, whose gRPC port is the next one (:func:`nightshift.deploy.grpc_port_for`).

    :raises OSError: no such pair found in ``tries`` picks."""
    for _ in range(tries):
        with socket.socket() as a, socket.socket() as b:
            a.bind((host, 0))
            p = int(a.getsockname()[1])
            if p >= 65535:
                continue
            try:
                b.bind((host, p + 1))
            except OSError:
                continue
            return p
    raise OSError(f"no two adjacent free TCP ports on {host} in {tries} tries")


@dataclass(frozen=True)
class ServingConfig:
    """How the inference image runs wherever it runs (system eval and deploy alike).

    :param mem_limit: docker memory limit; ``None`` for none.
    :param request_log_sample: share of requests written to the request log.
    :param environment: extra serving environment (``NIGHTSHIFT_REQUEST_LOG_ROTATE_S`` ...).
    """

    mem_limit: str | None = DEFAULT_MEM_LIMIT
    request_log_sample: float = DEPLOYED_REQUEST_LOG_SAMPLE
    environment: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, *, mem_limit: str | None = DEFAULT_MEM_LIMIT,
                 request_log_sample: float | None = None) -> "ServingConfig":
        """The deployed configuration: serving settings a platform sets on its workers
        (``NIGHTSHIFT_REQUEST_LOG_*``) reach the container."""
        env = {k: v for k, v in os.environ.items() if k.startswith("NIGHTSHIFT_REQUEST_LOG_")
               and k not in ("NIGHTSHIFT_REQUEST_LOG_DIR", "NIGHTSHIFT_REQUEST_LOG_SAMPLE")}
        sample = DEPLOYED_REQUEST_LOG_SAMPLE if request_log_sample is None else float(request_log_sample)
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"request log sample must be in [0, 1], got {sample}")
        return cls(mem_limit=mem_limit, request_log_sample=sample, environment=env)


def prepare_request_log_dir(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Create the host folder the server writes its request log to, writable by the
    serving user only (never world-writable: the log is the traffic drift_monitor judges).

    :returns: ``(path, user)``: as root the folder is owned by the image's serving
        user (:data:`SERVING_UID`) and ``user`` is None (the image's own); otherwise
        the folder stays this user's and the container runs as this user (``"uid:gid"``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, SERVING_UID, SERVING_UID)
        os.chmod(path, 0o750)
        return path, None
    os.chmod(path, 0o700)
    return path, f"{os.getuid()}:{os.getgid()}"


def serving_run_kwargs(image: str, *, name: str, port: int, config: ServingConfig,
                       request_log_dir: str | os.PathLike | None, labels: Mapping[str, str],
                       restart: bool = False, command: Any = None, grpc_port: int | None = None) -> dict[str, Any]:
    """``containers.run`` arguments for the inference image: host network bound to
    127.0.0.1:``port``, every capability dropped, no new privileges, the memory and
    process limits of ``config``, and the request log mounted at ``request_log_dir``.

    :param grpc_port: serve the OIP gRPC service on 127.0.0.1:``grpc_port`` too; ``None`` (default)
        turns it off (``NIGHTSHIFT_GRPC_PORT=off``): on the host network the image's fixed 8081
        would collide between two containers (blue/green, an evaluation beside the deployment).
    """
    env = {**config.environment, "NIGHTSHIFT_HOST": LOOPBACK, "NIGHTSHIFT_PORT": str(int(port)),
           "NIGHTSHIFT_GRPC_PORT": "off" if grpc_port is None else str(int(grpc_port))}
    kwargs: dict[str, Any] = dict(
        image=image, name=name, detach=True, network_mode="host", cap_drop=["ALL"],
        security_opt=["no-new-privileges"], pids_limit=PIDS_LIMIT, labels=dict(labels), auto_remove=False)
    if request_log_dir is not None:
        log_dir, user = prepare_request_log_dir(request_log_dir)
        env.update({"NIGHTSHIFT_REQUEST_LOG_DIR": CONTAINER_LOG_DIR,
                    "NIGHTSHIFT_REQUEST_LOG_SAMPLE": repr(float(config.request_log_sample))})
        kwargs["volumes"] = {str(log_dir): {"bind": CONTAINER_LOG_DIR, "mode": "rw"}}
        if user:
            kwargs["user"] = user
    kwargs["environment"] = env
    if config.mem_limit:
        kwargs["mem_limit"] = config.mem_limit
    if restart:
        kwargs["restart_policy"] = {"Name": "unless-stopped"}
    if command is not None:
        kwargs["command"] = command
    return kwargs


def run_serving_container(client: Any, image: str, **kwargs: Any) -> Any:
    """Start the inference image detached (see :func:`serving_run_kwargs` for the arguments)."""
    spec = serving_run_kwargs(image, **kwargs)
    return client.containers.run(spec.pop("image"), **spec)


def connect_docker(timeout_s: int = 600) -> Any:
    """A docker SDK client from the environment (``DOCKER_HOST``, else the local socket),
    checked with a ping. Operators with a ``docker_conn_id`` get theirs through
    ``nightshift.operators.base.resolve_docker_client``, which comes here when there is none.

    :raises DockerUnavailable: the daemon is unreachable; says how to start one.
    """
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailable(
            f"cannot reach the Docker daemon at {host}: {exc}. Start one with scripts/ensure_docker.sh "
            "(or `make setup`), or point DOCKER_HOST at a running daemon."
        ) from exc
    return client


def _container_logs(container: Any, tail: int = 80) -> str:
    try:
        return container.logs(tail=tail).decode("utf-8", errors="replace")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(could not read logs: {exc})"


def wait_ready(container: Any, url: str, *, timeout_s: float, model_name: str | None = None,
               expect_version: str | None = None, interval_s: float = 0.25) -> tuple[float, str | None]:
    """Wait until the inference server in ``container`` answers ``GET {url}/v2/health/ready``
    with 200 and, with ``model_name``, ``GET {url}/v2/models/{model_name}`` lists
    ``expect_version`` (any version when ``None``). The one readiness check of system
    evaluation and deployment.

    A container that exits, disappears or crashes (a restart policy brings a crashing server
    back again and again: the first crash is the answer, not the end of the timeout) fails at
    once, with its log.

    :returns: the seconds waited and the model's first reported version (``None`` without
        ``model_name``).
    :raises ServingError: as above, or not ready within ``timeout_s`` (with the last answer).
    """
    import requests
    from docker.errors import NotFound

    name = getattr(container, "name", "?")
    t0 = time.monotonic()
    last = "no answer yet"
    with requests.Session() as http:
        http.trust_env = False  # loopback only, never through a proxy
        while True:
            try:
                container.reload()
            except NotFound:
                raise ServingError(f"container {name} disappeared while waiting for it to be ready") from None
            state = container.attrs.get("State") or {}
            restarts = int(container.attrs.get("RestartCount") or 0)
            if state.get("Status") in ("exited", "dead", "restarting") or restarts:
                why = (f"crashed before it was ready and Docker restarted it {restarts} time(s)" if restarts else
                       f"exited with status {state.get('ExitCode')} before it was ready at {url}")
                raise ServingError(f"container {name} {why}", logs=_container_logs(container))
            try:
                r = http.get(f"{url}/v2/health/ready", timeout=2, headers={"Connection": "close"})
                if r.status_code != 200:
                    last = f"ready: HTTP {r.status_code}: {r.text[:300]}"
                elif model_name is None:
                    return time.monotonic() - t0, None
                else:
                    m = http.get(f"{url}/v2/models/{model_name}", timeout=2, headers={"Connection": "close"})
                    meta = m.json() if m.status_code == 200 else None
                    versions = [str(v) for v in (meta or {}).get("versions", [])] if isinstance(meta, dict) else []
                    if m.status_code == 200 and (expect_version is None or str(expect_version) in versions):
                        return time.monotonic() - t0, versions[0] if versions else ""
                    last = f"model metadata: HTTP {m.status_code}: {m.text[:300]}"
            except (requests.RequestException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - t0 > timeout_s:
                raise ServingError(f"container {name} was not ready at {url} within {timeout_s:.0f}s; "
                                   f"last answer: {last}", logs=_container_logs(container))
            time.sleep(interval_s)


#: ``ROLE_LABEL`` value of every evaluation container, so leftovers can be found.
ROLE_SYSTEM_EVAL = "system-eval"
STARTED_LABEL = "ai.nightshift.started"
HOST_LABEL = "ai.nightshift.host"
OWNER_LABEL = "ai.nightshift.owner"


class InferenceContainer:
    """One inference container for an evaluation, as a context manager.

    The container runs as :func:`nightshift.containers.serving_run_kwargs` says a
    serving container runs (the arguments :class:`nightshift.deploy.LocalDeployer`
    uses too): host network, 127.0.0.1 on a free port, ``config``'s memory limit,
    environment and request-log sampling, the request log mounted from
    ``request_log_dir``. It is labelled ``ai.nightshift.role=system-eval`` and has
    no restart policy. :meth:`stop` force-removes it; it is idempotent and
    thread-safe, so call it from ``finally`` and from an operator's ``on_kill``.

    :param image: image reference or id to run.
    :param docker_client: a ``docker.DockerClient``; default :func:`connect_docker`.
    :param port: port to serve on; default a free one.
    :param name: container name; default ``nightshift-eval-<random>``.
    :param config: how the image runs; default ``ServingConfig.from_env()`` (the deployed one).
    :param request_log_dir: host folder for the request log (created, not world-writable);
        ``None``: no request log.
    :param labels: extra labels.
    :param owner: recorded as label ``ai.nightshift.owner`` (e.g. ``dag/run/task``) for the sweep.
    :param command: override the image's command (tests and debugging).
    :param environment: extra environment variables on top of ``config``'s (tests and the
        model-load variant; the system evaluation passes none).
    :param volumes: extra docker volume bindings (tests and the model-load variant).
    :param grpc_port: also serve OIP gRPC on this port (``0``: a free one); default none (REST only).
    """

    def __init__(
        self,
        image: str,
        *,
        docker_client: Any | None = None,
        port: int | None = None,
        name: str | None = None,
        config: ServingConfig | None = None,
        request_log_dir: str | os.PathLike | None = None,
        labels: dict[str, str] | None = None,
        owner: str | None = None,
        command: str | Sequence[str] | None = None,
        environment: dict[str, str] | None = None,
        volumes: dict[str, dict[str, str]] | None = None,
        grpc_port: int | None = None,
    ):
        self.image = image
        self.client = docker_client
        # ports picked together are distinct (free_ports holds them all open while the OS picks)
        spare = free_ports(2) if grpc_port == 0 else ([] if port else [free_port()])
        self.port = port or spare.pop(0)
        self.grpc_port = None if grpc_port is None else (grpc_port or next(p for p in spare if p != self.port))
        self.name = name or f"nightshift-eval-{uuid.uuid4().hex[:12]}"
        config = config or ServingConfig.from_env()
        if environment:
            config = dataclasses.replace(config, environment={**config.environment, **environment})
        self.config = config
        self.request_log_dir = Path(request_log_dir) if request_log_dir is not None else None
        self.command = list(command) if command is not None and not isinstance(command, str) else command
        self.labels = {**(labels or {}), ROLE_LABEL: ROLE_SYSTEM_EVAL, STARTED_LABEL: str(int(time.time())),
                       HOST_LABEL: socket.gethostname()}
        if owner:
            self.labels[OWNER_LABEL] = owner
        self.volumes = volumes
        #: seconds :meth:`stop` gives the server to drain and write its request log before SIGKILL
        self.stop_timeout_s = 5.0
        self.container: Any = None
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL of the server, ``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        """``127.0.0.1:<grpc port>`` for a gRPC client, or ``None`` when the container serves REST only."""
        return None if self.grpc_port is None else f"{LOOPBACK}:{self.grpc_port}"

    @property
    def container_id(self) -> str | None:
        """The container's id once started."""
        return getattr(self.container, "id", None)

    def _client(self) -> Any:
        if self.client is None:
            self.client = connect_docker(timeout_s=120)
        return self.client

    def run_kwargs(self) -> dict[str, Any]:
        """The ``containers.run`` arguments (image included): :func:`serving_run_kwargs`
        for this container, plus the extra ``volumes`` when given. Creates the request-log folder."""
        spec = serving_run_kwargs(self.image, name=self.name, port=self.port, config=self.config,
                                  request_log_dir=self.request_log_dir, labels=self.labels, restart=False,
                                  command=self.command, grpc_port=self.grpc_port)
        if self.volumes:
            spec["volumes"] = {**spec.get("volumes", {}), **self.volumes}
        return spec

    def start(self) -> "InferenceContainer":
        """Run the image detached on the host network.

        :returns: ``self``.
        :raises ServingError: the image is missing or the daemon refused; the
            half-created container (if any) is removed.
        """
        from docker.errors import APIError, ImageNotFound

        client = self._client()
        with self._lock:
            if self._stopped:
                raise ServingError(f"container {self.name} was already stopped; create a new InferenceContainer")
            if self._started:
                return self
            self._started = True
        try:  # containers.run would try to *pull* a missing image; never do that
            client.images.get(self.image)
        except ImageNotFound:
            raise ServingError(f"image {self.image} does not exist in the local daemon; build it first") from None
        log.info("starting %s from %s on %s", self.name, self.image, self.url)
        try:
            spec = self.run_kwargs()
            container = client.containers.run(spec.pop("image"), **spec)
        except ImageNotFound as exc:
            self.stop()
            raise ServingError(f"image {self.image} does not exist in the local daemon; build it first") from exc
        except APIError as exc:
            self.stop()
            raise ServingError(f"could not start container {self.name} from {self.image}: {exc}") from exc
        except OSError as exc:  # the request-log folder could not be made
            self.stop()
            raise ServingError(f"could not prepare the request-log folder {self.request_log_dir} for "
                               f"{self.name}: {exc}") from exc
        with self._lock:
            self.container = container
            stopped = self._stopped
        if stopped:  # on_kill raced with start: make sure nothing is left behind
            self.stop()
            raise ServingError(f"container {self.name} was stopped while starting")
        return self

    def logs(self, tail: int = 200) -> str:
        """The container's last ``tail`` log lines ('' if unavailable)."""
        if self.container is None:
            return ""
        try:
            return self.container.logs(tail=tail).decode("utf-8", errors="replace")
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(could not read logs: {exc})"

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> float:
        """Poll ``GET /v2/health/ready`` until it answers 200 (:func:`wait_ready`).

        :returns: seconds it took.
        :raises ServingError: the container exited, or was not ready in time; carries the container log.
        """
        if self.container is None:
            raise ServingError(f"container {self.name} is not running; call start() first")
        waited, _ = wait_ready(self.container, self.url, timeout_s=timeout_s, interval_s=interval_s)
        return waited

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the server gracefully (SIGTERM: it finishes what it is answering and its request log
        writes what it holds; SIGKILL after ``timeout_s``, default :attr:`stop_timeout_s`), then
        remove the container. Idempotent; safe from another thread (``on_kill``)."""
        from docker.errors import APIError, NotFound

        with self._lock:
            self._stopped = True
            container, self.container = self.container, None
            started = self._started
        if not started or self.client is None:
            return
        try:
            if container is not None:
                try:
                    container.stop(timeout=int(max(1, self.stop_timeout_s if timeout_s is None else timeout_s)))
                except APIError as exc:  # already stopping or gone: removing it is what matters
                    log.debug("graceful stop of %s: %s", self.name, exc)
                container.remove(force=True)
            else:  # start() may have created it and failed before we got the handle
                self.client.containers.get(self.name).remove(force=True)
            log.info("removed container %s", self.name)
        except NotFound:
            pass
        except APIError as exc:
            if "already in progress" in str(exc):
                return
            log.warning("could not remove container %s: %s", self.name, exc)
            raise ServingError(f"could not remove container {self.name}: {exc}") from exc

    def __enter__(self) -> "InferenceContainer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def sweep_containers(docker_client: Any, *, older_than_s: float = 3600.0, role: str = ROLE_SYSTEM_EVAL,
                     this_host_only: bool = True) -> list[str]:
    """Remove evaluation containers left by dead workers: labelled with ``role`` and
    started more than ``older_than_s`` ago (a live evaluation is far shorter).

    :returns: the names removed.
    """
    from docker.errors import APIError, NotFound

    now = time.time()
    removed = []
    for c in docker_client.containers.list(all=True, filters={"label": f"{ROLE_LABEL}={role}"}):
        labels = c.labels or {}
        if this_host_only and labels.get(HOST_LABEL) not in (None, socket.gethostname()):
            continue
        try:
            started = float(labels.get(STARTED_LABEL, "0"))
        except ValueError:
            started = 0.0
        if now - started < older_than_s:
            continue
        try:
            c.remove(force=True)
            removed.append(c.name)
            log.warning("removed leftover evaluation container %s (started %.0fs ago)", c.name, now - started)
        except (NotFound, APIError) as exc:
            log.warning("could not remove leftover container %s: %s", c.name, exc)
    return removed


__all__ = ["CONTAINER_LOG_DIR", "DEPLOYED_REQUEST_LOG_SAMPLE", "DEPLOYMENT_LABEL", "HOST_LABEL", "InferenceContainer",
           "LOOPBACK", "MODEL_LABEL", "OWNER_LABEL", "ROLE_LABEL", "ROLE_SYSTEM_EVAL", "SERVING_UID", "STARTED_LABEL",
           "ServingConfig", "VERSION_LABEL", "connect_docker", "free_port", "free_ports", "prepare_request_log_dir",
           "run_serving_container", "serving_run_kwargs", "sweep_containers", "wait_ready"]
