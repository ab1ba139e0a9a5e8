"""One container runtime for the inference image: how a serving container runs.

System evaluation (:mod:`nightshift.evaluation`) and deployment
(:mod:`nightshift.deploy`) both start the inference image through
:func:`serving_run_kwargs`, so the gates measure exactly the configuration that
serves: the same request log at the same sampling rate, the same memory and
process limits, the same dropped capabilities and environment. Only the port,
the name, the labels and the restart policy differ.

No Airflow here; :mod:`docker` is imported where used.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
                       restart: bool = False, command: Any = None) -> dict[str, Any]:
    """``containers.run`` arguments for the inference image: host network bound to
    127.0.0.1:``port``, every capability dropped, no new privileges, the memory and
    process limits of ``config``, and the request log mounted at ``request_log_dir``."""
    env = {**config.environment, "NIGHTSHIFT_HOST": LOOPBACK, "NIGHTSHIFT_PORT": str(int(port))}
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


__all__ = ["CONTAINER_LOG_DIR", "DEPLOYED_REQUEST_LOG_SAMPLE", "DEPLOYMENT_LABEL", "LOOPBACK", "MODEL_LABEL",
           "ROLE_LABEL", "SERVING_UID", "ServingConfig", "VERSION_LABEL", "free_port", "prepare_request_log_dir",
           "run_serving_container", "serving_run_kwargs"]
