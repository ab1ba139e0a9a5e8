"""Nightshift against its peers: KServe's Python server and Triton's dynamic batcher (PyTriton).

    python bench/peers/setup.py          # once: the peers' virtualenvs (the comparison also makes them)
    python bench/serving.py --peers [--rounds N --seconds S --only kserve|pytriton --server-cpus 0,1 ...]

Same model file (the 32x32x3 ``small_cnn`` ONNX export of ``bench/serving.py``), same load
client (:mod:`nightshift.loadgen`, OIP v2 binary tensor extension over HTTP/1.1 keep-alive),
same run: every server is started once, then idles while the others are measured. Each
round measures c=1, c=16 and c=64 on every server back to back (the order rotates from round
to round, so no server always follows the same neighbour); figures are medians over rounds,
and the ratios the issue's targets name are medians of per-round ratios (the shared cores'
speed drifts between rounds and cancels within one).

Every server gets the same cores (``--server-cpus``, applied at start like ``bench/serving.py``'s
``pinned``), the same ONNX Runtime session options (intra-op threads, one inter-op thread, no
spinning) and, where it batches, the same batching limits:

* Nightshift: ``python -m serving.server``, ``instances`` model instances of ``threads`` threads,
  its dynamic batcher at ``max_batch`` images and ``queue_delay_ms``.
* PyTriton: ``instances`` Triton model instances (Python backend, one ORT session each),
  dynamic batching on with ``max_batch_size = max_batch`` and
  ``max_queue_delay_microseconds = queue_delay_ms * 1000``.
* KServe: one ``kserve.Model`` (one ORT session of ``threads`` threads) in KServe's default
  single uvicorn worker; KServe's Python server has no batcher. Measured with binary tensors
  (``kserve``) and with JSON (``kserve_json``): KServe's binary path is the slower of the two,
  so the KServe target is taken against whichever of the two is faster in that round.

Beyond throughput and latency, each load records the server's CPU time per answered
request (every process and thread of its tree, ``/proc``) and, from the servers' own
metrics, the mean batch each formed and where a request's time went.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from peers.setup import ensure, venv_python

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "bench" / "results" / "serving_peers.json"
LEVELS = (1, 16, 64)
#: contender -> (server it runs on, binary requests)
CONTENDERS = {"nightshift": ("nightshift", True), "kserve": ("kserve", True),
              "kserve_json": ("kserve", False), "pytriton": ("pytriton", True)}


# --------------------------------------------------------------------------- pure helpers


def rotation(names: list[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index``: round 0 a, b, c; round 1 b, c, a; ..."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text exposition -> ``{(metric name, label string): value}`` (comments skipped)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        try:
            out[(name, labels.rstrip("}"))] = float(value)
        except ValueError:
            continue
    return out


def metric(series: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels`` (0.0 when there is none)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lab), v in series.items() if n == name and all(w in lab.split(",") for w in want))


#: Triton's cumulative per-model counters (microseconds, requests, images, executions)
TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                   "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_compute_output_duration_us")
NIGHTSHIFT_STAGES = ("preprocess", "queue", "inference", "serialization")


def server_counters(kind: str, text: str, model: str) -> dict[str, float]:
    """The cumulative counters of one server's metrics page that :func:`breakdown` reads."""
    s = parse_prometheus(text)
    if kind == "pytriton":
        return {n: metric(s, n, model=model) for n in TRITON_COUNTERS}
    if kind == "nightshift":
        out = {"batch_sum": metric(s, "nightshift_batch_size_sum"),
               "batch_count": metric(s, "nightshift_batch_size_count"),
               "requests": metric(s, "nightshift_request_duration_seconds_count", route="infer"),
               "request_s": metric(s, "nightshift_request_duration_seconds_sum", route="infer")}
        for st in NIGHTSHIFT_STAGES:
            out[f"{st}_s"] = metric(s, "nightshift_stage_duration_seconds_sum", stage=st)
            out[f"{st}_n"] = metric(s, "nightshift_stage_duration_seconds_count", stage=st)
        return out
    if kind == "kserve":  # kserve.Model's own histograms: the rest of a request is FastAPI/uvicorn + (de)coding
        return {f"{st}_{x}": metric(s, f"request_{st}_seconds_{y}", model_name=model)
                for st in ("preprocess", "predict", "postprocess") for x, y in (("s", "sum"), ("n", "count"))}
    return {}


def breakdown(kind: str, before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What a load did inside the server, from its counters before and after: the mean batch
    it formed (images per model execution) and the mean time per request of each stage, in
    microseconds (``None`` where a counter did not move)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def per(num: str, den: str, scale: float = 1.0) -> float | None:
        return round(d[num] / d[den] * scale, 2) if d.get(den) else None

    if kind == "pytriton":
        return {"mean_batch": per("nv_inference_count", "nv_inference_exec_count"),
                "request_us": per("nv_inference_request_duration_us", "nv_inference_request_success"),
                "queue_us": per("nv_inference_queue_duration_us", "nv_inference_request_success"),
                "compute_input_us": per("nv_inference_compute_input_duration_us", "nv_inference_request_success"),
                # the Python backend's execute: PyTriton's proxy hand-off to the bench's process + ORT
                "compute_infer_us": per("nv_inference_compute_infer_duration_us", "nv_inference_request_success"),
                "compute_output_us": per("nv_inference_compute_output_duration_us",
                                         "nv_inference_request_success")}
    if kind == "nightshift":
        out = {"mean_batch": per("batch_sum", "batch_count"), "request_us": per("request_s", "requests", 1e6)}
        for st in NIGHTSHIFT_STAGES:
            # inference: a whole batch's ONNX Runtime call, observed once per request of it
            out[f"{st}_us"] = per(f"{st}_s", f"{st}_n", 1e6)
        return out
    if kind == "kserve":
        return {f"{st}_us": per(f"{st}_s", f"{st}_n", 1e6) for st in ("preprocess", "predict", "postprocess")}
    return {}


def paired_ratios(num: list[float | None], den: list[float | None]) -> list[float]:
    """Per-round ``num / den`` where both were measured (a round with no answer drops out)."""
    return [a / b for a, b in zip(num, den, strict=True) if a and b]


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def target_ratios(rounds: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """The issue's targets from every round's load summaries (``contender -> c -> [summary per round]``):
    each a median of per-round ratios, its per-round values, the target and whether it is met
    (``None`` when it could not be measured)."""
    def rps(name: str, c: int) -> list[float | None]:
        return [r["throughput_rps"] for r in rounds.get(name, {}).get(c, [])]

    def p99(name: str, c: int) -> list[float | None]:
        return [r["latency_ms"]["p99"] for r in rounds.get(name, {}).get(c, [])]

    def best_kserve(c: int) -> list[float | None]:  # KServe's faster encoding in each round
        b, j = rps("kserve", c), rps("kserve_json", c)
        if not j:
            return b
        return [max(x or 0.0, y or 0.0) or None for x, y in zip(b, j, strict=True)]

    specs = {
        "nightshift_over_kserve_c16": (rps("nightshift", 16), best_kserve(16), ">=", 3.0),
        "nightshift_over_pytriton_c1": (rps("nightshift", 1), rps("pytriton", 1), ">=", 1.0),
        "nightshift_over_pytriton_c16": (rps("nightshift", 16), rps("pytriton", 16), ">=", 1.0),
        "nightshift_p99_over_pytriton_p99_c64": (p99("nightshift", 64), p99("pytriton", 64), "<=", 1.0),
    }
    out = {}
    for key, (num, den, op, target) in specs.items():
        per_round = paired_ratios(num, den) if num and den else []
        value = median_or_none(per_round)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {"median": value, "rounds": [round(v, 3) for v in per_round], "target": f"{op} {target:g}",
                    "met": met}
    for enc, name in (("binary", "kserve"), ("json", "kserve_json")):  # each encoding on its own, for the record
        num, den = rps("nightshift", 16), rps(name, 16)
        out["nightshift_over_kserve_c16"][f"{enc}_median"] = median_or_none(paired_ratios(num, den) if num and den
                                                                             else [])
    return out


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds of one contender at one concurrency, and the error counts summed."""
    def med(key: str, sub: str | None = None) -> float | None:
        vals = [v for v in ((r[key][sub] if sub else r[key]) for r in runs) if v is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {"rps": med("throughput_rps"), "p50_ms": med("latency_ms", "p50"), "p99_ms": med("latency_ms", "p99"),
            "rps_rounds": [r["throughput_rps"] for r in runs],
            "errors": sum(r["errors"] for r in runs), "timeouts": sum(r["timeouts"] for r in runs),
            "rejected_503": sum(r["rejected_503"] for r in runs)}


# --------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (``/proc/<pid>/task/*/children``), alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process below it (each one's threads)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class PeerProcess:
    """A peer server in its own venv on 127.0.0.1 (started by us, stopped by PID with every
    process it started: PyTriton runs ``tritonserver`` and one backend stub per instance)."""

    def __init__(self, kind: str, argv: list[str], url: str, model: str, cpus: set[int] | None,
                 metrics_url: str | None = None, timeout_s: float = 120.0):
        self.kind, self.url, self.metrics_url = kind, url, metrics_url
        self.log = tempfile.NamedTemporaryFile(prefix=f"nightshift-bench-{kind}-", suffix=".log", delete=False)
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen(argv, env=env, cwd=HERE, stdout=self.log, stderr=self.log,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        try:
            from serving import wait_ready

            wait_ready(url, t0, lambda: self.proc.poll() is None, timeout_s, path=f"/v2/models/{model}/ready")
        except RuntimeError as exc:
            self.stop(keep_log=True)
            raise RuntimeError(f"{exc}; its log: {self.log.name}:\n{Path(self.log.name).read_text()[-2000:]}") from None
        self.ready_s = time.perf_counter() - t0

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM to the peer (it stops its own children), then SIGKILL by PID to any child left."""
        tree = descendants(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in tree:  # the peer's own processes only, each by its PID
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.log.close()
        if not keep_log:
            os.unlink(self.log.name)


def start_kserve(model_dir: Path, model: str, threads: int, cpus: set[int] | None) -> PeerProcess:
    from nightshift.containers import free_port

    port = free_port()
    argv = [str(venv_python("kserve")), str(HERE / "kserve" / "server.py"), "--model-dir", str(model_dir),
            "--name", model, "--http-port", str(port), "--threads", str(threads)]
    return PeerProcess("kserve", argv, f"http://127.0.0.1:{port}", model, cpus)


def start_pytriton(model_dir: Path, model: str, threads: int, instances: int, max_batch: int,
                   queue_delay_us: int, cpus: set[int] | None) -> PeerProcess:
    from nightshift.containers import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    argv = [str(venv_python("pytriton")), str(HERE / "pytriton" / "server.py"), "--model-dir", str(model_dir),
            "--name", model, "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--threads", str(threads), "--instances", str(instances), "--max-batch", str(max_batch),
            "--queue-delay-us", str(queue_delay_us)]
    return PeerProcess("pytriton", argv, f"http://127.0.0.1:{http}", model, cpus,
                       metrics_url=f"http://127.0.0.1:{metrics}/metrics")


def scrape(url: str) -> str:
    try:
        return requests.get(url, timeout=5).text
    except requests.RequestException:
        return ""


# --------------------------------------------------------------------------- the comparison


def peers_comparison(work: Path, *, rounds: int, seconds: float, threads: int, instances: int,
                     max_batch: int, queue_delay_ms: float, peers: tuple[str, ...] = ("kserve", "pytriton")) -> dict:
    """Start Nightshift and ``peers`` on the same cores, then ``rounds`` rounds of c=1/16/64 on
    each, alternating; every load's summary, CPU per request and server-side breakdown."""
    import serving

    for peer in peers:
        ensure(peer)
    model = "small_cnn"
    model_dir = serving.export_model(model, work)
    cpus = serving.PIN["server"]
    queue_delay_us = int(round(queue_delay_ms * 1000))
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "rounds": rounds, "seconds": seconds,
        "model": f"{model} 32x32x3 (bench/serving.py export_model)", "levels": list(LEVELS),
        "pinning": {k: sorted(v) if v else None for k, v in serving.PIN.items()},
        "config": {"ort_intra_op_threads": threads, "instances": instances, "max_batch": max_batch,
                   "queue_delay_ms": queue_delay_ms,
                   "nightshift": f"{instances} instances x {threads} ORT threads, dynamic batcher max {max_batch} "
                                 f"images, queue delay {queue_delay_ms:g} ms, request log off, binary",
                   "pytriton": f"{instances} Triton model instances (Python backend) x {threads} ORT threads, "
                               f"dynamic batching max_batch_size {max_batch}, max_queue_delay_microseconds "
                               f"{queue_delay_us}, binary tensor extension over HTTP",
                   "kserve": f"1 uvicorn worker, 1 ORT session x {threads} threads, no batching; v2 REST with the "
                             "binary tensor extension (kserve) and JSON (kserve_json); access/latency logs off"},
    }
    servers: dict = {}
    try:
        servers["nightshift"] = serving.ServerProcess(model_dir, threads, instances,
                                                      NIGHTSHIFT_MAX_BATCH_SIZE=str(max_batch),
                                                      NIGHTSHIFT_MAX_QUEUE_DELAY_MS=f"{queue_delay_ms:g}")
        if "kserve" in peers:
            servers["kserve"] = start_kserve(model_dir, model, threads, cpus)
        if "pytriton" in peers:
            servers["pytriton"] = start_pytriton(model_dir, model, threads, instances, max_batch, queue_delay_us, cpus)
        res["ready_s"] = {k: round(s.ready_s, 2) for k, s in servers.items()}
        res["versions"] = {k: _server_meta(s.url) for k, s in servers.items()}
        names = [n for n, (srv, _) in CONTENDERS.items() if srv in servers]
        for n in names:  # warm: first requests, first batches
            srv, binary = CONTENDERS[n]
            serving.load(servers[srv].url, model, 16, 1.0, binary=binary)
        raw = {n: {c: [] for c in LEVELS} for n in names}
        cpu = {n: {c: [] for c in LEVELS} for n in names}
        cores = {n: {c: [] for c in LEVELS} for n in names}
        client = {n: {c: [] for c in LEVELS} for n in names}
        # the model alone: ONNX Runtime in process, batch 1, the servers' session options, on their cores
        res["in_process_us_per_call"] = [round(1e6 / serving.in_process_rate(model_dir, threads, 1.0), 1)]
        inside = {n: {c: [] for c in LEVELS} for n in names}
        for i in range(rounds):
            for c in LEVELS:
                for n in rotation(names, i):
                    srv, binary = CONTENDERS[n]
                    s = servers[srv]
                    murl = getattr(s, "metrics_url", None) or f"{s.url}/metrics"
                    before_m = server_counters(srv, scrape(murl), model)
                    before, mine = tree_cpu_s(s.proc.pid), time.process_time()
                    r = serving.load(s.url, model, c, seconds, binary=binary)
                    mine = time.process_time() - mine  # the load client's CPU (this process)
                    # CPU of the load and its 0.5 s warm-up over the requests answered in both
                    answered = r["ok"] / max(r["duration_s"], 1e-9) * (r["duration_s"] + 0.5)
                    spent = tree_cpu_s(s.proc.pid) - before
                    cpu[n][c].append(round(spent / answered * 1e6, 1) if answered else None)
                    cores[n][c].append(round(spent / (r["duration_s"] + 0.5), 3))  # CPUs the server kept busy
                    client[n][c].append(round(mine / answered * 1e6, 1) if answered else None)
                    inside[n][c].append(breakdown(srv, before_m, server_counters(srv, scrape(murl), model)))
                    raw[n][c].append(r)
                print(f"round {i + 1}/{rounds} c={c}: " + "  ".join(
                    f"{n} {raw[n][c][-1]['throughput_rps'] or 0:,.0f}/s p99 {raw[n][c][-1]['latency_ms']['p99']} ms"
                    for n in names), flush=True)
        res["in_process_us_per_call"].append(round(1e6 / serving.in_process_rate(model_dir, threads, 1.0), 1))
    finally:
        for s in servers.values():
            s.stop()
    res["servers"] = {
        n: {f"c{c}": {**summarize(raw[n][c]),
                      "server_cpu_us_per_request": median_or_none([v for v in cpu[n][c] if v is not None]),
                      "server_cpu_us_rounds": cpu[n][c],
                      "server_cores_busy": median_or_none(cores[n][c]),
                      "server_cores_busy_rounds": cores[n][c],
                      "client_cpu_us_per_request": median_or_none([v for v in client[n][c] if v is not None]),
                      "inside": {k: median_or_none([b[k] for b in inside[n][c] if b.get(k) is not None])
                                 for k in (inside[n][c][0] if inside[n][c] else {})},
                      "status_counts": raw[n][c][-1]["status_counts"] if raw[n][c] else {}}
            for c in LEVELS} for n in names}
    res["targets"] = target_ratios(raw)
    return res


def _server_meta(url: str) -> dict:
    try:
        meta = requests.get(f"{url}/v2", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}
    return {k: meta[k] for k in ("name", "version") if k in meta}


def print_peers(res: dict) -> None:
    """The table and the target ratios, as the run's last lines."""
    print(f"\nNightshift vs peers ({res['rounds']} alternating rounds of {res['seconds']:g} s loads, "
          f"{res['cpus']} CPUs, pinning {res['pinning']}); medians over rounds:")
    for n, lv in res["servers"].items():
        for c in LEVELS:
            x = lv[f"c{c}"]
            rps = f"{x['rps']:9,.0f}/s" if x["rps"] else "        -"
            ins = ", ".join(f"{k} {v:g}" for k, v in x["inside"].items() if v is not None)
            print(f"  {n:11s} c={c:<3d} {rps}  p50 {x['p50_ms']} ms  p99 {x['p99_ms']} ms  server CPU "
                  f"{x['server_cpu_us_per_request']} us/request on {x.get('server_cores_busy')} cores  client "
                  f"{x.get('client_cpu_us_per_request')} us/request  "
                  f"errors {x['errors']} timeouts {x['timeouts']}"
                  + (f"  [{ins}]" if ins else ""))
    if "in_process_us_per_call" in res:
        print(f"  the model alone (ONNX Runtime in process, batch 1): {res['in_process_us_per_call']} us per call "
              "(before, after)")
    print("targets (medians of per-round ratios):")
    for k, t in res["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {k:40s} {t['median']} (target {t['target']}) {verdict}  rounds {t['rounds']}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/serving.py --peers",
                                 description="Nightshift vs KServe and PyTriton, same model, client and run")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each: c=1, 16, 64 on every server)")
    ap.add_argument("--seconds", type=float, default=2.5, help="per load (after a 0.5 s warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per session (every server)")
    ap.add_argument("--instances", type=int, default=0,
                    help="model instances of Nightshift and PyTriton (0: one per server CPU, the image's default)")
    ap.add_argument("--max-batch", type=int, default=32, help="dynamic batcher's largest batch (Nightshift, Triton)")
    ap.add_argument("--queue-delay-ms", type=float, default=2.0, help="dynamic batcher's queue delay (both)")
    ap.add_argument("--only", nargs="+", default=["kserve", "pytriton"], choices=["kserve", "pytriton"],
                    help="the peers to run (default: both)")
    ap.add_argument("--server-cpus", help="e.g. 0,1: every server runs on these cores")
    ap.add_argument("--client-cpus", help="e.g. 2,3: the load client runs on these cores")
    ap.add_argument("--models", help="use DIR/small_cnn/model.onnx instead of exporting")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import serving

    cpu_set = lambda v: {int(c) for c in v.split(",")} if v else None  # noqa: E731
    serving.PIN["server"], serving.PIN["client"] = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
    serving.MODELS["dir"] = Path(args.models).resolve() if args.models else None
    server_cpus = serving.PIN["server"] or os.sched_getaffinity(0)
    instances = args.instances or max(1, len(server_cpus) // args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        res = peers_comparison(Path(tmp), rounds=args.rounds, seconds=args.seconds, threads=args.threads,
                               instances=instances, max_batch=args.max_batch, queue_delay_ms=args.queue_delay_ms,
                               peers=tuple(args.only))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print_peers(res)
    return 0
