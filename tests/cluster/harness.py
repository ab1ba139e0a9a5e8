"""A private cluster profile for a test module: ``scripts/cluster/cluster.py`` on a fresh state
folder and a free block of loopback ports, with the REST API, the S3 gateway and the logs at hand."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster" / "cluster.py"
N_PORTS = 12  # scripts/cluster/cluster.py PORTS


def free_port_base(n: int = N_PORTS) -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of loopback ports")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def tis(self, dag_id: str, run_id: str) -> dict[str, dict]:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert r.status_code == 200, r.text
        return {ti["task_id"]: ti for ti in r.json()["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
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
