"""A private cluster profile for a test module: ``scripts/cluster/cluster.py`` on a fresh state
folder and a free block of loopback ports, with the REST API, the S3 gateway and the logs at hand."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightshift.containers import LOOPBACK, free_port  # noqa: F401 - free_port: the tests' deploy ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster" / "cluster.py"
N_PORTS = 12  # scripts/cluster/cluster.py PORTS
BUCKET = "nightshift-artifacts"
PREFIX = "artifacts"  # scripts/cluster/cluster.py ARTIFACT_ROOT = s3://nightshift-artifacts/artifacts


def free_port_base(n: int = N_PORTS) -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of loopback ports")


class Cluster:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.start_s: float | None = None
        self._token: str | None = None

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], env=self.env, cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout, check=False)

    @property
    def config(self) -> dict:
        return json.loads((self.home / "config.json").read_text())

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.config['ports']['airflow-api']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.config['ports']['mlflow']}"

    def api(self, method: str, path: str, **kw):
        import requests

        if self._token is None:
            r = requests.get(f"{self.api_base}/auth/token", timeout=10)  # SimpleAuthManager, all admins (dev)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return requests.request(method, f"{self.api_base}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self._token}"}, **kw)

    def pid(self, name: str) -> int:
        return json.loads((self.home / "pids" / f"{name}.pid").read_text())["pid"]

    def environ(self, name: str) -> dict[str, str]:
        """The environment Airflow component ``name`` is started with (``cluster.py env --component``;
        /proc/<pid>/environ is no use: Airflow's process titles overwrite it)."""
        r = self.cli("env", "--component", name, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def s3(self):
        import boto3

        s = self.config["secrets"]
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.config['ports']['s3']}",
                            aws_access_key_id=s["s3_access_key"], aws_secret_access_key=s["s3_secret_key"],
                            region_name="us-east-1")

    def keys(self, bucket: str, prefix: str) -> list[str]:
        out, token = [], None
        s3 = self.s3()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def object(self, key: str, bucket: str = BUCKET) -> bytes:
        return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()

    def run_folder(self, dag_id: str, run_id: str) -> str:
        """The run's folder key in the bucket (``<prefix>/runs/<dag id>/<run id>[~hash]/``)."""
        from nightshift.artifacts import folder_name

        base = f"{PREFIX}/runs/{folder_name(dag_id)}/"
        folders = {k[len(base):].split("/", 1)[0] for k in self.keys(BUCKET, base)}
        assert folder_name(run_id) in folders, (run_id, folder_name(run_id), sorted(folders))
        return base + folder_name(run_id) + "/"

    # -- MLflow --------------------------------------------------------------------------------------
    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def versions(self, model: str) -> list:
        return self.mlflow().search_model_versions(f"name='{model}'")

    def champion(self, model: str):
        return self.mlflow().get_model_version_by_alias(model, "champion")

    # -- faults --------------------------------------------------------------------------------------
    def kill(self, name: str) -> list[int]:
        """SIGKILL component ``name``'s whole process tree and its process group (a crash: no
        clean shutdown); its PID file stays, as after a real crash. Returns the PIDs signalled."""
        sys.path.insert(0, str(ROOT / "scripts"))
        from cluster.cluster import process_tree

        pid = self.pid(name)
        tree = process_tree(pid)
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        return tree

    def freeze(self, name: str) -> list[int]:
        """SIGSTOP component ``name``'s whole process tree: it holds every connection and answers
        nothing (a hung server) until it is killed or sent SIGCONT. Returns the PIDs stopped."""
        sys.path.insert(0, str(ROOT / "scripts"))
        from cluster.cluster import process_tree

        tree = process_tree(self.pid(name))
        for p in tree:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return tree

    def restart(self, *names: str, timeout: float = 300) -> None:
        """``cluster.py restart <names>``: whatever state they are in, they come back."""
        r = self.cli("restart", *names, timeout=timeout)
        assert r.returncode == 0, f"cluster.py restart {' '.join(names)} failed\n{r.stdout}\n{r.stderr}\n{self.logs()}"

    # -- Airflow -------------------------------------------------------------------------------------
    def wait_parsed(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.api("GET", f"/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} never parsed\n{self.logs()}"
            time.sleep(1)
        r = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        assert r.status_code == 200, r.text

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        r = self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()["state"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> tuple[str, dict[str, dict]]:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                break
            time.sleep(2)
        return state, self.tis(dag_id, run_id)

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states: tuple[str, ...], timeout: float,
                  poll: float = 1.0) -> dict:
        """Poll ``task_id`` until its state is one of ``states``; the task instance (whatever its
        state) when the time is up."""
        deadline = time.monotonic() + timeout
        ti: dict = {}
        while time.monotonic() < deadline:
            ti = self.tis(dag_id, run_id).get(task_id, {})
            if ti.get("state") in states:
                return ti
            time.sleep(poll)
        return ti

    def clear(self, dag_id: str, run_id: str, *task_ids: str) -> None:
        """Clear the tasks (and set their run running again), so a retry starts now rather than after
        the DAG's ``retry_delay``, as a person would from the UI."""
        r = self.api("POST", f"/dags/{dag_id}/clearTaskInstances",
                     json={"dry_run": False, "dag_run_id": run_id, "task_ids": list(task_ids), "only_failed": False,
                           "include_upstream": False, "include_downstream": False, "reset_dag_runs": True})
        assert r.status_code == 200, f"clearing {task_ids} of {run_id}: {r.status_code} {r.text}\n{self.logs()}"

    def runs(self, dag_id: str, run_type: str | None = None) -> list[dict]:
        """The DAG's runs (of ``run_type``: ``manual``, ``scheduled``, ``asset_triggered``, ...), oldest first."""
        r = self.api("GET", f"/dags/{dag_id}/dagRuns",
                     params={"order_by": "run_after", "limit": 100, **({"run_type": run_type} if run_type else {})})
        assert r.status_code == 200, r.text
        return r.json()["dag_runs"]

    def tis(self, dag_id: str, run_id: str) -> dict[str, dict]:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert r.status_code == 200, r.text
        return {ti["task_id"]: ti for ti in r.json()["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                     params={"deserialize": "true"})
        assert r.status_code == 200, r.text
        value = r.json()["value"]
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def task_logs(self, worker: str, dag_id: str, run_id: str, task_id: str) -> dict[int, str]:
        """The task's log files (attempt -> text) in ``worker``'s own AIRFLOW_HOME/logs."""
        base = self.home / worker / "home" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return {int(f.stem.split("=", 1)[1]): f.read_text(errors="replace") for f in base.glob("attempt=*.log")}

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted([*self.home.glob("logs/*.log"), *self.home.glob("worker-*/console.log")]):
            parts.append(f"===== {f.relative_to(self.home)} =====\n{f.read_text(errors='replace')[-tail:]}")
        for f in sorted(self.home.glob("worker-*/home/logs/**/*.log")):
            parts.append(f"===== {f.relative_to(self.home)} =====\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def describe(tis: dict[str, dict]) -> str:
    """Each task's state, queue and try number (for assertion messages)."""
    return json.dumps({k: (v["state"], v["queue"], v["try_number"]) for k, v in tis.items()}, indent=1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def docker_ready() -> str | None:
    """None when a daemon answers and the base image is there (starting them as make setup does)."""
    for script in ("ensure_docker.sh", "ensure_base_image.sh"):
        r = subprocess.run(["bash", str(ROOT / "scripts" / script)], env={**os.environ}, capture_output=True,
                           text=True, timeout=900, check=False)
        if r.returncode:
            return f"{script}: {r.stdout}{r.stderr}"
    return None


def require_docker() -> None:
    """Skip (fail with ``NIGHTSHIFT_REQUIRE_DOCKER=1``) when there is no daemon for the docker queue."""
    import pytest

    problem = docker_ready()
    if problem:
        (pytest.fail if os.environ.get("NIGHTSHIFT_REQUIRE_DOCKER") == "1" else pytest.skip)(
            f"no Docker daemon / base image for the docker queue: {problem}")


def remove_model_containers(model: str) -> None:
    """A test model's serving containers and images (their bind mounts are in the cluster's folder)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=ai.nightshift.model={model}"],
                         capture_output=True, text=True, check=False).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
    images = subprocess.run(["docker", "images", "-q", f"nightshift/{model}"], capture_output=True, text=True,
                            check=False).stdout.split()
    if images:
        subprocess.run(["docker", "rmi", "-f", *set(images)], capture_output=True, check=False)


def start(prefix: str, extra_env: dict[str, str] | None = None, dags: Path | None = None) -> Cluster:
    """``cluster.py up`` on a fresh state folder under the project's .nightshift/ (not pytest's 0700
    tmp: the postgres user must reach its data folder) and a free block of ports."""
    (ROOT / ".nightshift").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / ".nightshift"))
    home.chmod(0o755)
    env = {**os.environ, "NIGHTSHIFT_CLUSTER_HOME": str(home), "NIGHTSHIFT_CLUSTER_PORT_BASE": str(free_port_base()),
           **({"NIGHTSHIFT_CLUSTER_DAGS_FOLDER": str(dags)} if dags else {}), **(extra_env or {})}
    c = Cluster(home, env)
    t0 = time.monotonic()
    r = c.cli("up", "--no-install") if _servers_installed() else c.cli("up")
    c.start_s = time.monotonic() - t0
    if r.returncode != 0:
        logs = c.logs()
        stop(c)
        raise AssertionError(f"cluster up failed\n{r.stdout}\n{r.stderr}\n{logs}")
    print(r.stdout)
    return c


def _servers_installed() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))) and shutil.which("redis-server") is not None


def stop(c: Cluster) -> None:
    """``cluster.py down``, then remove the state folder (kept, logs and all, with
    ``NIGHTSHIFT_TEST_KEEP_CLUSTER=1``)."""
    r = c.cli("down", timeout=300)
    print(r.stdout, r.stderr)
    left = [f.name for f in c.home.glob("pids/*.pid")]
    assert r.returncode == 0 and not left, f"cluster down left {left}\n{r.stdout}\n{r.stderr}"
    if os.environ.get("NIGHTSHIFT_TEST_KEEP_CLUSTER") == "1":
        print(f"cluster state kept in {c.home}")
    else:
        shutil.rmtree(c.home, ignore_errors=True)
