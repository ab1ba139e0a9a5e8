"""Shared plumbing for Nightshift operators."""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from airflow.sdk import BaseOperator

from nightshift.artifacts import run_dir
from nightshift.errors import ConfigError, DockerUnavailable, NightshiftError
from nightshift.settings import Settings


def resolve_docker_client(conn_id: str | None, *, timeout_s: int = 600) -> Any:
    """The ``docker.DockerClient`` of every Docker call a task makes (build, system evaluation,
    the approval's image check, set-champion, deploy), checked with a ping.

    ``conn_id`` ``None`` (or empty): the worker's environment, ``DOCKER_HOST`` or the local socket
    (:func:`nightshift.inference_image.connect_docker`). Otherwise the Airflow connection of
    that id (the docker provider's ``docker`` type), resolved through the provider's
    ``DockerHook``:

    * extra ``docker_url``: the daemon, e.g. ``unix:///var/run/docker.sock`` or
      ``tcp://10.0.0.5:2376``; default ``DOCKER_HOST``, else the local socket;
    * extras ``tls_ca_cert``, ``tls_client_cert``, ``tls_client_key`` (file paths on the worker)
      and ``tls_verify`` (default true): TLS to the daemon;
    * host, port, login, password: the registry to log in to (as ``DockerOperator`` does);
      a connection without a login logs in nowhere.

    :raises ConfigError: the connection is not defined, its TLS extras are incomplete, or the
        registry refused the login; the message names the connection.
    :raises DockerUnavailable: the daemon does not answer; names the connection and the URL.
    """
    conn_id = str(conn_id or "").strip() or None
    if conn_id is None:
        from nightshift import inference_image

        return inference_image.connect_docker(timeout_s)

    import os

    import docker
    from airflow.providers.docker.hooks.docker import DockerHook
    from airflow.sdk import BaseHook
    from docker.errors import APIError

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException (SDK or core) or a secrets backend's
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        raise ConfigError(f"Docker connection {conn_id!r} is not defined (docker_conn_id / "
                          f"NIGHTSHIFT_DOCKER_CONN_ID): add it (Admin > Connections, or AIRFLOW_CONN_"
                          f"{conn_id.upper()}) with the daemon in the extra 'docker_url', or unset it to use "
                          "the worker's DOCKER_HOST") from None
    extra = conn.extra_dejson or {}
    url = str(extra.get("docker_url") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    tls_files = [extra.get(k) for k in ("tls_ca_cert", "tls_client_cert", "tls_client_key")]
    tls: Any = None
    if any(tls_files):
        if not all(tls_files):
            raise ConfigError(f"Docker connection {conn_id!r}: TLS needs all of the extras tls_ca_cert, "
                              "tls_client_cert and tls_client_key (file paths on the worker)")
        verify = str(extra.get("tls_verify", True)).strip().lower() not in ("false", "0", "no", "off")
        tls = DockerHook.construct_tls_config(ca_cert=tls_files[0], client_cert=tls_files[1],
                                              client_key=tls_files[2], verify=verify)
    # the hook logs in to the connection's registry only when it is given the id
    hook = DockerHook(docker_conn_id=conn_id if conn.login else None, base_url=url, tls=tls, timeout=timeout_s)
    try:
        api = hook.api_client
    except APIError as exc:
        if getattr(exc, "status_code", None) in (401, 403):
            raise ConfigError(f"Docker connection {conn_id!r}: the registry {conn.host} refused the login of "
                              f"{conn.login!r}: {exc}") from exc
        raise DockerUnavailable(f"Docker connection {conn_id!r}: the daemon at {url} failed: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the hook raises AirflowException for an unreachable daemon
        if type(exc).__name__ == "AirflowNotFoundException":  # a login without a registry host
            raise ConfigError(f"Docker connection {conn_id!r}: {exc}") from exc
        raise DockerUnavailable(f"Docker connection {conn_id!r}: cannot reach the Docker daemon at {url} "
                                f"({exc}); check the connection's 'docker_url' extra and that the daemon runs "
                                "there") from exc
    client = docker.DockerClient.__new__(docker.DockerClient)  # the high-level client over the hook's API
    client.api = api
    return client


def _fail_fast(execute: Callable[..., Any]) -> Callable[..., Any]:
    """Deterministic failures (bad data, bad config, parity breach, no GPU) fail the
    task at once: retrying cannot fix them. Anything else keeps the DAG's retries."""

    @functools.wraps(execute)
    def wrapper(self: "NightshiftOperator", context: Any) -> Any:
        try:
            return execute(self, context)
        except NightshiftError as exc:
            if not exc.retryable:
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


class NightshiftOperator(BaseOperator):
    """Base class: settings, the run's artifact folder, the MLflow client, and
    no retries for errors that a retry cannot fix."""

    ui_color = "#e8eaf6"
    #: The Airflow connection of the Docker daemon; the operators that use Docker take it as an
    #: argument (templated). ``None``: ``NIGHTSHIFT_DOCKER_CONN_ID`` of the worker, else its environment.
    docker_conn_id: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "execute" in cls.__dict__:
            cls.execute = _fail_fast(cls.__dict__["execute"])  # type: ignore[method-assign]

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    def run_dir(self, context: Any, *parts: str) -> Path:
        path = run_dir(self.settings.artifact_root, self.dag_id, context["run_id"]).joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def mlflow(self):
        from nightshift import registry

        return registry.client(self.settings.mlflow_tracking_uri, self.settings.mlflow_registry_uri)

    def docker_client(self) -> Any:
        """The Docker client of this task, from ``docker_conn_id`` (else ``NIGHTSHIFT_DOCKER_CONN_ID``
        where the task runs, else ``DOCKER_HOST``): the one way every Nightshift operator talks to
        Docker (:func:`resolve_docker_client`)."""
        from nightshift.placement import DockerPlacement

        conn_id = str(self.docker_conn_id or "").strip() or DockerPlacement.from_env().conn_id
        if conn_id:
            self.log.info("Docker: the daemon of connection %r", conn_id)
        return resolve_docker_client(conn_id)

    @staticmethod
    def require(value: Any, name: str, upstream: str) -> Any:
        """Upstream XCom values must be present; say which task to look at when not."""
        if not value:
            raise ConfigError(f"{name} is empty: expected the result of the '{upstream}' task (XCom)")
        return value


def shape3(value: Any) -> tuple[int, int, int] | None:
    if value in (None, "", []):
        return None
    try:
        h, w, c = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"image_shape must be [height, width, channels], got {value!r}") from exc
    if min(h, w) < 1 or c not in (1, 3):
        raise ConfigError(f"image_shape {value!r}: sizes must be positive and channels 1 or 3")
    return (h, w, c)
