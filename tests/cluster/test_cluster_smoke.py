"""The cluster profile (``make cluster``) end to end, started through the project's own script.

``scripts/cluster/cluster.py up`` starts a profile of its own here (fresh state folder, free
ports, every component's DAGs folder pointed at ``tests/cluster/dags``): PostgreSQL, Redis,
SeaweedFS's S3 gateway, an MLflow tracking server and Airflow with the CeleryExecutor and two
workers. The test triggers ``cluster_smoke`` through the REST API and checks that

- each task ran on the worker its queue names (``default`` -> ``worker-default``,
  ``gpu`` -> ``worker-gpu``): the task reports its process ancestry, which holds the PID the
  script recorded for that worker, and the worker's own AIRFLOW_HOME and working directory;
- the two workers share no folder (working directory, AIRFLOW_HOME, TMPDIR);
- an object one task wrote to the S3 gateway was read by the other through its URI;
- the MLflow run's artifact landed in SeaweedFS (bucket ``nightshift-mlflow``), and reads back
  through the tracking server;

then stops everything with ``cluster.py down`` and checks that no recorded process is left.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from cluster.cluster import process_tree  # scripts/ is on pytest's path
from tests.cluster.harness import Cluster, free_port_base

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster" / "cluster.py"
DAG_ID = "cluster_smoke"
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster():
    # under the project's .nightshift/ (not pytest's 0700 tmp): the postgres user must reach its data dir
    (ROOT / ".nightshift").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="cluster-test-", dir=ROOT / ".nightshift"))
    home.chmod(0o755)
    env = {**os.environ, "NIGHTSHIFT_CLUSTER_HOME": str(home),
           "NIGHTSHIFT_CLUSTER_PORT_BASE": str(free_port_base()),
           "NIGHTSHIFT_CLUSTER_DAGS_FOLDER": str(ROOT / "tests" / "cluster" / "dags")}
    c = Cluster(home, env)
    try:
        t0 = time.monotonic()
        r = c.cli("up")
        c.start_s = time.monotonic() - t0
        assert r.returncode == 0, f"cluster up failed\n{r.stdout}\n{r.stderr}\n{c.logs()}"
        print(r.stdout)
        yield c
    finally:
        r = c.cli("down", timeout=300)
        print(r.stdout, r.stderr)
        left = []
        for f in home.glob("pids/*.pid"):
            left.append(f.name)
        assert r.returncode == 0 and not left, f"cluster down left {left}\n{r.stdout}\n{r.stderr}"
        shutil.rmtree(home, ignore_errors=True)


def _xcom(c: Cluster, run_id: str, task_id: str) -> dict:
    r = c.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
              params={"deserialize": "true"})
    assert r.status_code == 200, r.text
    value = r.json()["value"]
    return json.loads(value) if isinstance(value, str) else value


def test_cluster_smoke(cluster: Cluster):
    c = cluster
    status = json.loads(c.cli("status", "--json").stdout)
    assert all(row["running"] for row in status), status
    idle_rss = sum(row["rss_mb"] for row in status)

    # every listening socket of every component is on loopback
    pids = {p for row in status if row["pid"] for p in process_tree(row["pid"])}
    listening = _listening_addresses(pids)
    assert listening and all(a.startswith("127.") or a == "::1" for a in listening), listening

    # the DAG reaches the metadata DB through the dag-processor, then runs under the scheduler
    deadline = time.monotonic() + 90
    while c.api("GET", f"/dags/{DAG_ID}").status_code != 200:
        assert time.monotonic() < deadline, f"{DAG_ID} never parsed\n{c.logs()}"
        time.sleep(1)
    assert c.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    t0 = time.monotonic()
    r = c.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    state = None
    while time.monotonic() - t0 < RUN_TIMEOUT_S:
        state = c.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(1)
    run_s = time.monotonic() - t0
    tis = {ti["task_id"]: ti for ti in c.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()[
        "task_instances"]}
    assert state == "success", f"run {run_id}: {state}; " + json.dumps(
        {k: (v["state"], v["queue"], v["hostname"]) for k, v in tis.items()}) + "\n" + c.logs()
    assert {k: (v["state"], v["queue"]) for k, v in tis.items()} == {
        "write_object": ("success", "default"), "read_and_log": ("success", "gpu")}

    written, read = _xcom(c, run_id, "write_object"), _xcom(c, run_id, "read_and_log")
    # each task ran in the process tree of the worker its queue is bound to
    for out, worker in ((written, "worker-default"), (read, "worker-gpu")):
        where = out["where"]
        assert where["worker"] == worker
        assert c.pid(worker) in where["pids"], (worker, c.pid(worker), where)
        assert Path(where["airflow_home"]) == c.home / worker / "home"
        assert Path(where["cwd"]) == c.home / worker / "cwd"
    other = {"worker-default": "worker-gpu", "worker-gpu": "worker-default"}
    for out in (written, read):
        mine = out["where"]
        theirs = (read if out is written else written)["where"]
        assert theirs["worker"] == other[mine["worker"]]
        for a in (mine["cwd"], mine["airflow_home"], mine["tmpdir"]):
            for b in (theirs["cwd"], theirs["airflow_home"], theirs["tmpdir"]):
                assert not _overlap(Path(a), Path(b)), (a, b)

    # the object went through the S3 gateway, addressed by its URI
    assert written["uri"].startswith("s3://nightshift-artifacts/cluster-smoke/")
    assert read["read"] == written["body"]
    bucket, key = written["uri"].removeprefix("s3://").split("/", 1)
    assert c.s3().get_object(Bucket=bucket, Key=key)["Body"].read().decode() == written["body"]

    # the MLflow run's artifact is an object in SeaweedFS, and reads back through the tracking server
    run = read["mlflow_run_id"]
    keys = [o["Key"] for o in c.s3().list_objects_v2(Bucket="nightshift-mlflow", Prefix="mlflow/").get("Contents", [])]
    assert any(run in k and k.endswith("smoke/payload.txt") for k in keys), keys
    assert _mlflow_text(c, run) == written["body"]
    print(f"\ncluster profile: started in {c.start_s:.0f}s, idle RSS {idle_rss:.0f} MB "
          f"(PSS {sum(r['pss_mb'] for r in status):.0f} MB); cluster_smoke ran in {run_s:.1f}s")


def _mlflow_text(c: Cluster, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{c.config['ports']['mlflow']}"
    with tempfile.TemporaryDirectory() as d:
        path = MlflowClient(tracking_uri=uri).download_artifacts(run_id, "smoke/payload.txt", d)
        return Path(path).read_text()


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on (/proc/net/tcp{,6})."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addrs = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            ip = f[1].split(":")[0]
            if v6:
                raw = bytes.fromhex(ip)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addrs.add(socket.inet_ntop(socket.AF_INET6, words))
            else:
                addrs.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip)[::-1]))
    return addrs
