"""Where a served request's CPU goes: per-thread CPU time of the server and the load client.

    python bench/serving_cpu.py [--seconds 5] [--repeats 3]   # writes bench/results/serving_cpu.json

Runs ``python -m serving.server`` (small_cnn, 32x32x3, the default layout: one
1-thread model instance per CPU) and :mod:`nightshift.loadgen` at concurrency 1
and 16, and reads each server thread's CPU time and scheduler statistics from
``/proc/<pid>/task/<tid>/{stat,schedstat}`` (Linux) and the client's from
``getrusage``. Per request: how much CPU the model instances, the event-loop
thread and the client spent, how much of the machine was used, and how long
each thread sat runnable but off a core (run-queue wait). With the two
throughputs this says how close concurrency 16 is to what the cores allow.

It also measures how the bare model scales across the cores: one in-process
session per core, all running at once, against one session alone (persistent
worker processes, alternating pairs). Two cores busy with ONNX Runtime do not
each run as fast as one core alone (shared caches, memory bandwidth, clock
boost, neighbours on a shared host), and no server can beat that; with the
measured CPU per request beside the model it gives the per-request overhead
that the two serving targets together would allow.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "plugins"))

from serving import SHAPE, ServerProcess, export_model, in_process_rate  # noqa: E402  (bench/serving.py)

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, dict[str, float]]:
    """CPU seconds and run-queue wait seconds of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            sched = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:  # the thread ended
            continue
        f = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = {"cpu_s": (int(f[11]) + int(f[12])) / TICK, "wait_s": int(sched[1]) / 1e9}
    return out


def machine_ticks() -> list[int]:
    """/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal (all cores)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def measure(srv: ServerProcess, concurrency: int, seconds: float) -> dict:
    from nightshift.loadgen import infer_request, run_load

    x = np.random.default_rng(2).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    req = infer_request(srv.url, "small_cnn", x)
    run_load(srv.url, req, concurrency=concurrency, duration_s=1.0, warmup_s=0)
    main_tid = srv.proc.pid
    m_a = machine_ticks()
    a, ru_a, t0 = threads(srv.proc.pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = run_load(srv.url, req, concurrency=concurrency, duration_s=seconds, warmup_s=0).summary()
    b, ru_b, elapsed = threads(srv.proc.pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    m_d = [y - x for x, y in zip(m_a, machine_ticks())]
    n = max(1, res["ok"])
    d = {tid: {k: b[tid][k] - a.get(tid, {}).get(k, 0.0) for k in ("cpu_s", "wait_s")} for tid in b}
    loop = d.pop(main_tid)
    others = sorted(d.values(), key=lambda v: -v["cpu_s"])
    client = (ru_b.ru_utime + ru_b.ru_stime) - (ru_a.ru_utime + ru_a.ru_stime)
    workers = [v for v in others if v["cpu_s"] > 0.01 * elapsed]
    return {
        "concurrency": concurrency, "rps": res["throughput_rps"], "requests": res["ok"],
        "ms_per_request": {"event_loop": round(loop["cpu_s"] / n * 1e3, 3),
                           "model_instances": round(sum(v["cpu_s"] for v in workers) / n * 1e3, 3),
                           "client": round(client / n * 1e3, 3)},
        "cores_used": round((loop["cpu_s"] + sum(v["cpu_s"] for v in others) + client) / elapsed, 2),
        # share of all cores' time that nothing ran (idle + iowait) and that the host took (steal)
        "machine_idle_share": round((m_d[3] + m_d[4]) / max(1, sum(m_d)), 3),
        "machine_steal_share": round(m_d[7] / max(1, sum(m_d)), 3),
        "runqueue_wait_share": {"event_loop": round(loop["wait_s"] / elapsed, 2),
                                "model_instances": [round(v["wait_s"] / elapsed, 2) for v in workers]},
    }


def _core_worker(model_dir: str, cpu: int, conn) -> None:
    """One ONNX Runtime session pinned to ``cpu``; answers each ``seconds`` sent with calls/s."""
    os.sched_setaffinity(0, {cpu})
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    for _ in range(20):
        sess.run(None, {"pixels": x})
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {"pixels": x})
            n += 1
        conn.send(n / (time.perf_counter() - t0))


def core_scaling(model_dir: Path, seconds: float, pairs: int) -> dict:
    """Per-core speed of the bare model with every core running it at once, over one core alone.

    One pinned worker process per core (``os.sched_getaffinity``); each pair runs one worker
    alone (the cores in turn) and all of them together, in alternating order, and the figure
    is the median of the per-pair ratios (mean rate together / rate alone).
    """
    cores = sorted(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("spawn")
    workers = []
    try:
        for cpu in cores:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_core_worker, args=(str(model_dir), cpu, child), daemon=True)
            proc.start()
            workers.append((proc, parent))
        for _, conn in workers:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a core_scaling worker did not start")

        def run(ws: list) -> list[float]:
            for _, conn in ws:
                conn.send(seconds)
            return [conn.recv() for _, conn in ws]

        ratios, alone_all, together_all = [], [], []
        for i in range(pairs):
            solo = [workers[i % len(workers)]]
            first_alone = i % 2 == 0
            alone = run(solo)[0] if first_alone else None
            together = run(workers)
            if not first_alone:
                alone = run(solo)[0]
            ratios.append(statistics.mean(together) / alone)
            alone_all.append(alone)
            together_all.append(round(sum(together), 1))
    finally:
        for proc, conn in workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return {"cores": len(cores), "pairs": pairs, "seconds": seconds,
            "per_core_speed_all_busy": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios], "alone_calls_per_s": [round(a, 1) for a in alone_all],
            "together_calls_per_s": together_all}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scaling-pairs", type=int, default=12,
                    help="alternating pairs for the model's scaling across cores (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_cpu.json"))
    args = ap.parse_args()
    runs: dict[int, list[dict]] = {1: [], 16: []}
    direct = []
    scaling = None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model("small_cnn", Path(tmp))
        if args.scaling_pairs:
            scaling = core_scaling(model_dir, min(args.seconds, 2.0), args.scaling_pairs)
            print(json.dumps({k: v for k, v in scaling.items() if k == "per_core_speed_all_busy"}), flush=True)
        for _ in range(args.repeats):
            direct.append(in_process_rate(model_dir, 1, args.seconds))
            srv = ServerProcess(model_dir, 1, 0)
            try:
                for c in runs:
                    runs[c].append(measure(srv, c, args.seconds))
            finally:
                srv.stop()
    cpus = os.cpu_count() or 1

    def med(c: int, *path: str) -> float:
        vals = []
        for r in runs[c]:
            v = r
            for p in path:
                v = v[p]
            vals.append(v)
        return statistics.median(vals)

    total16 = sum(med(16, "ms_per_request", k) for k in ("event_loop", "model_instances", "client"))
    out = {
        "date": time.strftime("%Y-%m-%d"), "cpus": cpus, "seconds": args.seconds, "repeats": args.repeats,
        "in_process_calls_per_s": statistics.median(direct),
        "model_ms_in_process": 1e3 / statistics.median(direct),
        "runs": runs,
        "c16_ms_per_request": {k: med(16, "ms_per_request", k) for k in ("event_loop", "model_instances", "client")},
        "c16_cpu_ms_per_request": round(total16, 3),
        # what the cores allow at concurrency 16 if every core were busy all the time
        "c16_ceiling_rps": round(cpus * 1e3 / total16, 1),
        "c16_rps": med(16, "rps"), "c1_rps": med(1, "rps"),
        "c16_share_of_ceiling": round(med(16, "rps") / (cpus * 1e3 / total16), 3),
        "c16_machine_idle_share": med(16, "machine_idle_share"),
        "ceiling_vs_c1": round(cpus * 1e3 / total16 / med(1, "rps"), 3),
        "c16_over_c1": round(med(16, "rps") / med(1, "rps"), 3),
        "c1_over_in_process": round(med(1, "rps") / statistics.median(direct), 3),
        # c=1 >= 0.75x in process and c=16 >= 2x c=1 together need c=16 >= 1.5x in process
        "both_targets_need_c16_rps": round(1.5 * statistics.median(direct), 1),
    }
    if scaling is not None:
        speed = scaling["per_core_speed_all_busy"]
        model_ms = 1e3 / statistics.median(direct)
        need = out["both_targets_need_c16_rps"]
        out["core_scaling"] = scaling
        # a server with nothing but the model on every core, each at the speed measured with all busy
        out["model_only_c16_bound_rps"] = round(cpus * speed * statistics.median(direct), 1)
        # CPU per request beside the model (event loop + client) that still reaches `need`:
        # cpus / need seconds of CPU per request, minus the model's at all-busy speed
        out["both_targets_allow_overhead_ms"] = round(cpus * 1e3 / need - model_ms / speed, 3)
        out["c16_overhead_ms"] = round(out["c16_ms_per_request"]["event_loop"]
                                       + out["c16_ms_per_request"]["client"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
