"""``nightly_retrain`` on the embedded profile vs the cluster profile, and the cluster's peak memory
(issue 20's first two targets: cluster wall <= 1.5x embedded; peak RSS of the whole cluster profile
while a run goes <= 4 GB).

One fresh cluster profile (``scripts/cluster/cluster.py up`` through ``tests/cluster/harness.py``: a
state folder of its own under ``.nightshift/`` and a free block of loopback ports) and one fresh
embedded profile (its own NIGHTSHIFT_HOME in a temporary folder: SQLite Airflow DB, SQLite MLflow, a
local artifact root; ``airflow db migrate`` and the pools before any timing). Then ``--repeats``
pairs, the order alternating (embedded first, then cluster first, ...), each run with the same
Params (the bundled digits, ``--epochs``, no deploy) and a model name of its own for the pair, so
every run is its model's first (same work: no champion to re-score) in both profiles:

- embedded: ``airflow dags test nightly_retrain --conf ...`` in a subprocess, timed from its start
  to its exit (includes the CLI's own start-up and DAG parse, as ``make run`` does);
- cluster: triggered through the REST API, timed from the POST to the run's terminal state
  (polled every 0.5 s; includes the scheduler's and the Celery workers' latency).

Memory is sampled every ``--sample-s`` seconds while each cluster run goes, three ways, over the
process trees of every component the profile started (Postgres, Redis, SeaweedFS, MLflow,
api-server, scheduler, dag-processor, triggerer, both workers with their task processes):
``cluster_pss``: the sum of PSS (each shared page split between the processes that share it: the
profile's own footprint, the figure for the target); ``cluster_rss``: the sum of VmRSS (shared pages
counted once per process, so it overstates: the forked Airflow and Celery processes share much);
and ``machine_used``: MemTotal - MemAvailable from /proc/meminfo, which includes the serving
container system_eval starts, the Docker daemon and anything else on the machine (other users
included: the baseline before the profile started is reported alongside).

    python bench/cluster.py [--repeats 3] [--epochs 6]

Writes bench/results/cluster.json and prints a summary table. Needs Docker (build and system_eval).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file's own folder (first on sys.path) would make `cluster` this module, not scripts/cluster/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DAG_ID = "nightly_retrain"
BIN = Path(sys.executable).parent


def _conf(model: str, epochs: int) -> dict:
    return {"model_name": model, "source": "bundled", "epochs": epochs, "deploy_target": "none"}


# ------------------------------------------------------------------------------------------ memory
def _meminfo_used_mb() -> float:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cluster_pids(home: Path) -> set[int]:
    """Every process of the profile: the trees of the PIDs it recorded (pids/*.pid)."""
    from cluster.cluster import process_tree

    pids: set[int] = set()
    for f in home.glob("pids/*.pid"):
        try:
            pids.update(process_tree(int(json.loads(f.read_text())["pid"])))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def _cluster_mem_mb(home: Path) -> tuple[float, float]:
    """(sum of VmRSS, sum of PSS) over the profile's processes, in MB."""
    pids = _cluster_pids(home)
    return sum(_rss_kb(p) for p in pids) / 1024, sum(_pss_kb(p) for p in pids) / 1024


class Sampler:
    """Peak cluster RSS and machine-wide used memory, sampled in a thread while a run goes."""

    def __init__(self, home: Path, every_s: float) -> None:
        self.home, self.every_s = home, every_s
        self.peak_rss = self.peak_pss = self.peak_used = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = _cluster_mem_mb(self.home)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_used = max(self.peak_used, _meminfo_used_mb())
            self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------ embedded
def embedded_env(home: Path) -> dict[str, str]:
    """scripts/env.sh's embedded profile in a folder of its own (nothing of the cluster's)."""
    drop = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "MLFLOW_", "AWS_", "NIGHTSHIFT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("AIRFLOW_HOME", "PYTHONPATH")}
    env.update({
        "NIGHTSHIFT_ROOT": str(ROOT), "NIGHTSHIFT_HOME": str(home), "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "NIGHTSHIFT_BASE_IMAGE": os.environ.get("NIGHTSHIFT_BASE_IMAGE", "nightshift/base:bookworm"),
        # the project's serving wheelhouse (make setup), as the cluster's docker worker gets a copy of it
        "NIGHTSHIFT_WHEELHOUSE": str(ROOT / ".nightshift" / "wheelhouse"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True", "AIRFLOW__API__HOST": "127.0.0.1",
        "GX_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT / "plugins"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    })
    return env


def embedded_setup(env: dict[str, str]) -> None:
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    for argv in ([str(BIN / "airflow"), "db", "migrate"],
                 [sys.executable, str(ROOT / "scripts" / "load_airflow_settings.py"), str(ROOT / "airflow_settings.yaml")]):
        r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"embedded set-up: {' '.join(argv[:3])} failed\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def embedded_run(env: dict[str, str], conf: dict, log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        r = subprocess.run([str(BIN / "airflow"), "dags", "test", DAG_ID, "--conf", json.dumps(conf)], env=env,
                           cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1800)
    wall = time.perf_counter() - t0
    state = _last_run_state(env)
    if r.returncode != 0 or state != "success":
        raise SystemExit(f"embedded run {state} (exit {r.returncode}); log {log}:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")
    return {"seconds": wall}


def _last_run_state(env: dict[str, str]) -> str | None:
    """The state of the embedded profile's newest nightly_retrain run (its SQLite metadata DB)."""
    import sqlite3

    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)).fetchone()
    return row[0] if row else None


# ------------------------------------------------------------------------------------------ cluster
def cluster_run(c, conf: dict, run_id: str, sample_s: float) -> dict:
    with Sampler(c.home, sample_s) as s:
        t0 = time.perf_counter()
        c.trigger(DAG_ID, conf, run_id)
        while True:
            state = c.run_state(DAG_ID, run_id)
            if state in ("success", "failed"):
                break
            if time.perf_counter() - t0 > 1800:
                raise SystemExit(f"cluster run {run_id} still {state} after 30 min")
            time.sleep(0.5)
        wall = time.perf_counter() - t0
    if state != "success":
        from tests.cluster.harness import describe

        raise SystemExit(f"cluster run {run_id} {state}\n{describe(c.tis(DAG_ID, run_id))}\n{c.logs()}")
    return {"seconds": wall, "peak_cluster_rss_mb": s.peak_rss, "peak_cluster_pss_mb": s.peak_pss,
            "peak_machine_used_mb": s.peak_used,
            "samples": s.samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval while a cluster run goes")
    ap.add_argument("--out", default=str(RESULTS / "cluster.json"))
    args = ap.parse_args()

    from tests.cluster import harness

    problem = harness.docker_ready()
    if problem:
        raise SystemExit(f"needs a Docker daemon and the base image: {problem}")
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-cluster-"))
    env = embedded_env(work / "embedded")
    t = time.perf_counter()
    embedded_setup(env)
    print(f"embedded profile set up in {time.perf_counter() - t:.0f}s ({work / 'embedded'})", flush=True)
    baseline_used = _meminfo_used_mb()
    c = harness.start("bench-cluster-", {"NIGHTSHIFT_CLUSTER_AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"})
    token = os.urandom(3).hex()
    runs: dict[str, list[dict]] = {"embedded": [], "cluster": []}
    try:
        c.wait_parsed(DAG_ID)
        (idle_rss, idle_pss), idle_used = _cluster_mem_mb(c.home), _meminfo_used_mb()
        print(f"cluster up in {c.start_s:.0f}s; idle: cluster RSS {idle_rss:.0f} MB, PSS {idle_pss:.0f} MB, machine used "
              f"{idle_used:.0f} MB (before the profile: {baseline_used:.0f} MB)", flush=True)
        for rep in range(args.repeats):
            conf = _conf(f"bench-{token}-{rep}", args.epochs)
            order = ("embedded", "cluster") if rep % 2 == 0 else ("cluster", "embedded")
            for kind in order:
                load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
                if kind == "embedded":
                    run = embedded_run(env, conf, work / f"embedded-{rep}.log")
                else:
                    run = cluster_run(c, conf, f"bench_{token}_{rep}", args.sample_s)
                run["loadavg_1m_before"] = load
                runs[kind].append(run)
                extra = (f", peak cluster RSS {run['peak_cluster_rss_mb']:.0f} MB, PSS {run['peak_cluster_pss_mb']:.0f} MB, "
                         f"machine used {run['peak_machine_used_mb']:.0f} MB" if kind == "cluster" else "")
                print(f"repeat {rep + 1} {kind:8s}: {run['seconds']:6.1f}s (load {load:.1f} before){extra}", flush=True)
    finally:
        harness.stop(c)
        shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, k: str) -> float:
        return statistics.median(r[k] for r in runs[kind])

    emb, clu = med("embedded", "seconds"), med("cluster", "seconds")
    peak_rss = max(r["peak_cluster_rss_mb"] for r in runs["cluster"])
    peak_pss = max(r["peak_cluster_pss_mb"] for r in runs["cluster"])
    peak_used = max(r["peak_machine_used_mb"] for r in runs["cluster"])
    result = {
        "what": "nightly_retrain wall time, embedded (airflow dags test, SQLite, local artifact root) vs cluster "
                "(REST trigger to terminal state; Postgres, Redis, SeaweedFS S3 artifact root, MLflow server, "
                "CeleryExecutor with two workers); peak memory while the cluster runs go",
        "params": _conf("bench-<token>-<repeat>", args.epochs), "repeats": args.repeats,
        "order": "alternating (embedded first on even repeats)", "cpus": len(os.sched_getaffinity(0)),
        "mem_total_mb": round(float(Path("/proc/meminfo").read_text().split()[1]) / 1024),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "embedded_median_s": emb, "cluster_median_s": clu, "ratio": clu / emb, "target_ratio": 1.5,
        "cluster_start_s": c.start_s,
        "memory": {
            "peak_cluster_pss_mb": peak_pss, "median_peak_cluster_pss_mb": med("cluster", "peak_cluster_pss_mb"),
            "peak_cluster_rss_mb": peak_rss, "median_peak_cluster_rss_mb": med("cluster", "peak_cluster_rss_mb"),
            "peak_machine_used_mb": peak_used, "machine_used_before_profile_mb": baseline_used,
            "idle_cluster_pss_mb": idle_pss, "idle_cluster_rss_mb": idle_rss, "idle_machine_used_mb": idle_used,
            "target_mb": 4096,
            "how": "over the process trees of the profile's components (pids/*.pid): cluster_pss = sum of PSS (a "
                   "shared page split between its sharers: the profile's own footprint), cluster_rss = sum of "
                   "VmRSS (shared pages counted once per process: overstates); machine_used = MemTotal - "
                   "MemAvailable (includes the serving container, the Docker daemon and anything else on the "
                   f"machine); sampled every {args.sample_s}s during cluster runs",
        },
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'profile':<10}{'median s':>10}{'runs s':>28}")
    for kind in ("embedded", "cluster"):
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs[kind])
        print(f"{kind:<10}{med(kind, 'seconds'):>10.1f}{each:>28}")
    print(f"cluster / embedded = {result['ratio']:.2f}x (target <= 1.5x)")
    print(f"peak cluster PSS {peak_pss:.0f} MB (target <= 4096 MB), RSS sum {peak_rss:.0f} MB; peak machine used "
          f"{peak_used:.0f} MB ({peak_used - baseline_used:+.0f} MB vs before the profile); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
