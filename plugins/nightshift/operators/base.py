"""Shared plumbing for Nightshift operators."""

from __future__ import annotations

import functools
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

from airflow.sdk import BaseOperator

from nightshift.artifacts import run_dir, run_path
from nightshift.errors import ConfigError, DockerUnavailable, NightshiftError
from nightshift.settings import Settings


def get_connection(conn_id: str, what: str, source: str, how: str) -> Any:
    """The Airflow connection ``conn_id``, or a :class:`ConfigError` saying that ``what`` (e.g.
    ``"Docker connection"``) named by ``source`` is not defined, how to add it (``AIRFLOW_CONN_<ID>``
    or the UI), and ``how`` (its fields, or what to unset instead). Other lookup errors (a secrets
    backend's) propagate.

    Outside a task the task SDK's lookup reads the metadata DB only in a process that says it is an
    Airflow server; elsewhere (``airflow dags test`` and its run-note listener, a script) a
    connection added in the UI would not be found: then the metadata DB is asked directly
    (:func:`_metadata_db_connection`)."""
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException (SDK or core) or a secrets backend's
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
    conn, db_error = _metadata_db_connection(conn_id)
    if conn is not None:
        return conn
    unread = f"; the metadata DB could not be read ({db_error})" if db_error else ""
    raise ConfigError(f"{what} {conn_id!r} is not defined ({source}{unread}): add it (Admin > Connections, or "
                      f"AIRFLOW_CONN_{conn_id.upper()}) {how}") from None


def _metadata_db_connection(conn_id: str) -> tuple[Any, str | None]:
    """``(connection, None)`` for a connection stored in Airflow's metadata DB, ``(None, None)`` when
    it is not there or this is a task (which never opens the DB: the SDK already asked the API
    server, which reads it), ``(None, why)`` when the DB cannot be read (e.g. no DB configured here).

    Airflow 3's SDK lookup (``Connection.get``) includes the metadata DB only under a task's
    supervisor or in a server process (``_AIRFLOW_PROCESS_CONTEXT=server``: API server, scheduler);
    this reads it the way the server does (``MetastoreBackend``)."""
    import sys

    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    if getattr(runner, "SUPERVISOR_COMMS", None) is not None:
        return None, None
    try:
        from airflow.secrets.metastore import MetastoreBackend

        return MetastoreBackend().get_connection(conn_id), None
    except Exception as exc:  # noqa: BLE001 - no DB here, or not migrated: report it with "not defined"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def resolve_docker_client(conn_id: str | None, *, timeout_s: int = 600) -> Any:
    """The ``docker.DockerClient`` of every Docker call a task makes (build, system evaluation,
    the approval's image check, set-champion, deploy), checked with a ping.

    ``conn_id`` ``None`` (or empty): the worker's environment, ``DOCKER_HOST`` or the local socket
    (:func:`nightshift.containers.connect_docker`). Otherwise the Airflow connection of
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
        from nightshift import containers

        return containers.connect_docker(timeout_s)

    import os

    import docker
    from airflow.providers.docker.hooks.docker import DockerHook
    from docker.errors import APIError

    conn = get_connection(conn_id, "Docker connection", "docker_conn_id / NIGHTSHIFT_DOCKER_CONN_ID",
                          "with the daemon in the extra 'docker_url', or unset it to use the worker's DOCKER_HOST")
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


def artifact_s3_options(conn_id: str | None = None) -> Any:
    """The :class:`~nightshift.store.S3Options` of an ``s3://`` artifact root, from the Airflow
    connection ``conn_id`` (default ``NIGHTSHIFT_ARTIFACT_CONN_ID``), or ``None`` when no
    connection is named (the store then reads the worker's environment, ``AWS_ACCESS_KEY_ID`` &
    co., ``S3Options.from_env``).

    The connection is the amazon provider's ``aws`` type: login = access key id, password =
    secret access key; extras ``endpoint_url`` (or ``service_config.s3.endpoint_url``),
    ``region_name``, ``aws_session_token``. An endpoint or region the connection leaves out
    comes from the environment.

    :raises ConfigError: the connection is not defined; the message names it.
    """
    conn_id = str(conn_id if conn_id is not None else os.environ.get("NIGHTSHIFT_ARTIFACT_CONN_ID") or "").strip()
    if not conn_id:
        return None

    from nightshift.store import S3Options

    conn = get_connection(conn_id, "artifact-store connection", "NIGHTSHIFT_ARTIFACT_CONN_ID",
                          "as an 'aws' connection with the access key as login, the secret as password and the "
                          "extra 'endpoint_url' for a non-AWS store, or unset NIGHTSHIFT_ARTIFACT_CONN_ID to use "
                          "the worker's AWS_* environment")
    extra = conn.extra_dejson or {}
    env = S3Options.from_env()
    s3_config = ((extra.get("service_config") or {}).get("s3") or {}) if isinstance(extra.get("service_config"),
                                                                                   dict) else {}
    return S3Options(endpoint_url=extra.get("endpoint_url") or s3_config.get("endpoint_url") or env.endpoint_url,
                     region_name=extra.get("region_name") or env.region_name,
                     access_key=conn.login or None, secret_key=conn.password or None,
                     session_token=extra.get("aws_session_token") or None)


def artifact_store() -> Any:
    """The artifact store a task uses (:meth:`NightshiftOperator.store`), for ``@task`` functions:
    an ``s3://`` root with the credentials of ``NIGHTSHIFT_ARTIFACT_CONN_ID`` when set."""
    from nightshift.store import is_remote

    s = Settings.from_env()
    return s.store(s3=artifact_s3_options() if is_remote(s.artifact_uri) else None)


def _is_store_uri(store: Any, value: str) -> bool:
    return "://" in value and value.startswith(store.uri.rstrip("/") + "/")


def localize(store: Any, value: Any) -> Any:
    """``value`` (an upstream XCom: dicts, lists, strings) with every URI under ``store``
    fetched and replaced by its local path; a snapshot's URI (``snapshots/...``) stays a URI
    (operators fetch it with :func:`nightshift.data.snapshot.fetch_snapshot`, and the
    registry records it). Returns new containers; ``value`` is not changed.

    :raises StoreError: a URI names nothing in the store, or it cannot be read (names it).
    """
    if isinstance(value, str):
        if _is_store_uri(store, value) and not (store.rel(value) or "").startswith("snapshots/"):
            return str(store.fetch(value))
        return value
    if isinstance(value, dict):
        return {k: localize(store, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(localize(store, v) for v in value)
    return value


#: Top folders of the working copy that belong to the host, not the store: the serving container's
#: request log (appended to continuously on the Docker host; drift_monitor publishes what it reads).
HOST_LOCAL = ("request_logs",)


def to_uris(store: Any, value: Any, keep_local: Path | None = None) -> Any:
    """``value`` (a task's return value) with every absolute path under ``store``'s working
    copy replaced by its URI; an existing file outside ``keep_local`` (the run folder, which
    the caller publishes) is published first (a folder never: whoever writes one publishes it).
    Paths under :data:`HOST_LOCAL` stay paths. Returns new containers.

    :raises StoreError: a publish failed (names the URI).
    """
    if isinstance(value, str):
        if not value.startswith("/"):
            return value
        rel = store.rel(value)
        if not rel:  # outside the store, or its root itself
            return value
        if rel.split("/", 1)[0] in HOST_LOCAL:
            return value  # the Docker host's own folders (the request log): never in the store
        p = Path(value)
        inside = keep_local is not None and p.resolve().is_relative_to(Path(keep_local).resolve())
        if not inside and p.is_file():
            return store.publish(p)
        return store.to_uri(p)
    if isinstance(value, dict):
        return {k: to_uris(store, v, keep_local) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_uris(store, v, keep_local) for v in value)
    return value


class RunFolderSync:
    """One task's view of its DAG run's folder on an object-store root: :meth:`pull` fetches
    what earlier tasks (and earlier tries) of the run published, the whole folder or only the
    parts the task reads, and notes each file; :meth:`push` publishes the files this task wrote
    or changed since (never a file it only read, so parallel tasks of a run do not overwrite each
    other's files with stale copies)."""

    def __init__(self, store: Any, folder: Path) -> None:
        self.store, self.folder = store, Path(folder)
        self._seen: dict[Path, tuple[int, int, int]] = {}

    def _files(self) -> dict[Path, tuple[int, int, int]]:
        from nightshift.store import _in_temp

        out = {}
        if self.folder.is_dir():
            for f in self.folder.rglob("*"):
                if (f.is_file() and not f.is_symlink() and not f.name.endswith(".lock")
                        and not _in_temp(f.relative_to(self.folder).as_posix())):
                    st = f.stat()
                    out[f] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return out

    def pull(self, reads: Sequence[str] | None = None) -> None:
        """Fetch the run folder (``reads`` ``None``: all of it, a LIST and a HEAD per object), or only
        the files and sub-folders ``reads`` names, relative to it (a HEAD and a LIST each), e.g. a
        task's own folder, where an earlier try left its resume state."""
        if reads is None:
            self.store.fetch(self.store.to_uri(self.folder), required=False)
        else:
            for part in reads:
                rel = Path(part)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise ValueError(f"run_folder_reads: {part!r} is not a path inside the run folder")
                self.store.fetch(self.store.to_uri(self.folder / rel), required=False)
        self._seen = self._files()

    def note_read(self, path: Path) -> None:
        """Note the files at or under ``path`` that the task fetched itself during ``execute`` (a file
        chosen only then, e.g. the winning trial's checkpoint) as read, so :meth:`push` does not
        publish them again over what their writer published."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            return
        for f, ident in self._files().items():
            if f.resolve().is_relative_to(path):
                self._seen[f] = ident

    def push(self, path: Path | None = None) -> list[str]:
        """Publish what changed under the run folder (or only ``path``); returns the URIs."""
        out = []
        files = self._files()
        for f, ident in sorted(files.items()):
            if path is not None and f != Path(path):
                continue
            if self._seen.get(f) != ident:
                out.append(self.store.publish(f))
                self._seen[f] = ident
        return out


def _sync_store(execute: Callable[..., Any]) -> Callable[..., Any]:
    """With an object-store artifact root: fetch the DAG run's folder and the upstream URIs in
    the template fields (:attr:`NightshiftOperator.store_inputs`) before the task, publish what
    it wrote to the run folder afterwards (on failure too: a failed validation's report must be
    readable), and hand on URIs instead of working-copy paths. A local root: nothing changes."""

    @functools.wraps(execute)
    def wrapper(self: "NightshiftOperator", context: Any) -> Any:
        store = self.store
        if not store.remote or getattr(self, "_run_sync", None) is not None:
            return execute(self, context)
        sync = RunFolderSync(store, run_path(self.settings.artifact_root, self.dag_id, context["run_id"]))
        sync.pull(self.run_folder_reads)
        fields = self.template_fields if self.store_inputs is None else self.store_inputs
        for name in fields:
            if hasattr(self, name):
                setattr(self, name, localize(store, getattr(self, name)))
        self._run_sync = sync
        try:
            result = execute(self, context)
        except BaseException:
            try:
                sync.push()
            except Exception as exc:  # noqa: BLE001 - the task's own error is the one to report
                self.log.error("publishing the run folder %s after the failure failed: %s", sync.folder, exc)
            raise
        finally:
            self._run_sync = None
        sync.push()
        return to_uris(store, result, sync.folder)

    return wrapper


class NightshiftOperator(BaseOperator):
    """Base class: settings, the artifact store, the run's artifact folder, the MLflow client,
    and no retries for errors that a retry cannot fix. With an object-store artifact root every
    ``execute`` runs between a fetch and a publish of the DAG run's folder (:func:`_sync_store`)."""

    ui_color = "#e8eaf6"
    #: Template fields that hold upstream results: with an object-store artifact root, a URI
    #: under the store in them is fetched before ``execute`` and replaced by its local path
    #: (:func:`localize`; snapshot URIs stay URIs). ``None``: every template field.
    store_inputs: Sequence[str] | None = None
    #: What of its DAG run's folder the task reads by path (relative to the folder; its upstream
    #: results come through :attr:`store_inputs` instead): with an object-store root only these are
    #: fetched before ``execute``. ``()``: nothing; a file known only during ``execute`` is fetched
    #: there (:meth:`fetch_input`). ``None``: the whole folder (one HEAD per object); every
    #: Nightshift operator declares what it reads instead (a test holds them to it). A subclass may
    #: make it a property of its rendered arguments (a sweep trial: its own trial's folder).
    run_folder_reads: Sequence[str] | None = None
    _run_sync: "RunFolderSync | None" = None
    #: The Airflow connection of the Docker daemon; the operators that use Docker take it as an
    #: argument (templated). ``None``: ``NIGHTSHIFT_DOCKER_CONN_ID`` of the worker, else its environment.
    docker_conn_id: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "execute" in cls.__dict__:
            cls.execute = _fail_fast(_sync_store(cls.__dict__["execute"]))  # type: ignore[method-assign]

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    @cached_property
    def store(self) -> Any:
        """The artifact store (:mod:`nightshift.store`); an ``s3://`` root reads its credentials
        from the connection ``NIGHTSHIFT_ARTIFACT_CONN_ID`` when set (:func:`artifact_s3_options`),
        else from the worker's environment. Built on first use, never at parse time."""
        from nightshift.store import is_remote

        s = self.settings
        return s.store(s3=artifact_s3_options() if is_remote(s.artifact_uri) else None)

    def publish(self, path: str | os.PathLike) -> str:
        """Publish ``path`` (a file or folder of the working copy) now, e.g. a checkpoint mid-task;
        returns its URI (the path itself on a local root)."""
        if self._run_sync is not None and Path(path).is_file():
            uris = self._run_sync.push(Path(path))
            if uris:
                return uris[0]
            if self.store.rel(path) and Path(path).resolve().is_relative_to(self._run_sync.folder.resolve()):
                return self.store.to_uri(path)  # unchanged since the last push: already there
        return self.store.publish(path)

    def fetch_input(self, value: str | os.PathLike, *, required: bool = True) -> Path:
        """The local copy of ``value`` (a URI or path under the artifact root) that ``execute`` reads,
        fetched now when the root is an object store: for an input that only ``execute`` can name, or
        one file of an upstream result whose other files the task does not need (``store_inputs``
        would fetch all of them). A file of the run folder fetched this way is not published again.

        :raises StoreError: nothing there (``required``), or it cannot be read (names the URI).
        """
        path = self.store.fetch(value, required=required)
        if self._run_sync is not None:
            self._run_sync.note_read(path)
        return path

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
