"""Serving benchmarks: the inference server under load vs ONNX Runtime in process.

    python bench/serving.py [--quick] [--soak]   # `make bench` runs it; writes docs/benchmarks-serving.json

Every figure is a ratio against a baseline measured in the same run; medians of
repeats. The server runs as its own process (``python -m serving.server``,
exactly the image's entry point) on 127.0.0.1; the load client is
:mod:`nightshift.loadgen` (one asyncio loop, keep-alive connections). Both sides
use the same model file and the same ONNX Runtime thread count.

Models: ``small_cnn`` on 32x32x3 (the issue's reference) and ``resnet18`` on
32x32x3, both with random weights (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

SHAPE = (32, 32, 3)


def export_model(arch: str, work: Path) -> Path:
    """A random-weight ``arch`` classifier exported the way the pipeline exports (model.onnx + model.json)."""
    import torch

    from nightshift.export import export_and_verify
    from nightshift.models import Classifier

    torch.manual_seed(0)
    model = Classifier(arch, 10, SHAPE, [0.5] * 3, [0.25] * 3, width=32).eval()
    ckpt = {"model_config": model.config, "state_dict": model.state_dict(),
            "class_names": [f"c{i}" for i in range(10)], "data_digest": "bench"}
    x = np.random.default_rng(0).integers(0, 256, (64, *SHAPE), dtype=np.uint8)
    return Path(export_and_verify(ckpt, work / arch, x, model_name=arch)["model_dir"])


def in_process_rate(model_dir: Path, threads: int, seconds: float) -> float:
    """Calls per second of ``session.run`` on one image (the baseline)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    for _ in range(50):
        sess.run(None, {"pixels": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"pixels": x})
        n += 1
    return n / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m serving.server`` on 127.0.0.1 (started by us, stopped by PID)."""

    def __init__(self, model_dir: Path, threads: int, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
        e.update({"NIGHTSHIFT_MODEL_DIR": str(model_dir), "NIGHTSHIFT_PORT": str(self.port),
                  "NIGHTSHIFT_ORT_THREADS": str(threads), "PYTHONPATH": str(ROOT / "plugins" / "nightshift")}, **env)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.server"], env=e,
                                     cwd=ROOT / "plugins" / "nightshift", stderr=subprocess.PIPE, text=True)
        import requests

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > 60:
                raise RuntimeError("server not ready in 60 s")
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load(url: str, model: str, concurrency: int, seconds: float, binary: bool = True) -> dict:
    from nightshift.loadgen import infer_request, run_load

    x = np.random.default_rng(2).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    req = infer_request(url, model, x, binary=binary)
    return run_load(url, req, concurrency=concurrency, duration_s=seconds, timeout_s=2.0, warmup_s=0.5).summary()


def bench_model(arch: str, work: Path, *, repeats: int, seconds: float, threads: int) -> dict:
    model_dir = export_model(arch, work)
    out: dict = {"arch": arch, "threads": threads, "repeats": repeats, "seconds": seconds}
    direct, c1_bin, c1_json, ready = [], [], [], []
    levels = {c: [] for c in (1, 4, 16, 64)}
    for _ in range(repeats):  # interleaved so machine noise hits every figure
        direct.append(in_process_rate(model_dir, threads, seconds))
        srv = ServerProcess(model_dir, threads)
        ready.append(srv.ready_s)
        try:
            for c in levels:
                levels[c].append(load(srv.url, arch, c, seconds))
            c1_json.append(load(srv.url, arch, 1, seconds, binary=False))
        finally:
            srv.stop()
        c1_bin.append(levels[1][-1])

    def med(runs: list[dict], key: str, sub: str | None = None) -> float:
        vals = [(r[key][sub] if sub else r[key]) for r in runs]
        return statistics.median(v for v in vals if v is not None)

    out["in_process_calls_per_s"] = statistics.median(direct)
    out["ready_s"] = statistics.median(ready)
    out["json_c1_rps"] = med(c1_json, "throughput_rps")
    for c, runs in levels.items():
        out[f"c{c}"] = {"rps": med(runs, "throughput_rps"), "p50_ms": med(runs, "latency_ms", "p50"),
                        "p99_ms": med(runs, "latency_ms", "p99"), "timeouts": sum(r["timeouts"] for r in runs),
                        "rejected_503": sum(r["rejected_503"] for r in runs),
                        "errors": sum(r["errors"] for r in runs)}
    out["ratio_c1_binary_vs_in_process"] = out["c1"]["rps"] / out["in_process_calls_per_s"]
    out["ratio_c16_vs_c1"] = out["c16"]["rps"] / out["c1"]["rps"]
    out["ratio_c64_p99_vs_p50"] = out["c64"]["p99_ms"] / out["c64"]["p50_ms"]
    out["ratio_binary_vs_json_c1"] = out["c1"]["rps"] / out["json_c1_rps"]
    return out


def soak(work: Path, seconds: float, threads: int) -> dict:
    model_dir = export_model("small_cnn", work)
    srv = ServerProcess(model_dir, threads)
    try:
        r = load(srv.url, "small_cnn", 64, seconds)
    finally:
        srv.stop()
    r["5xx"] = sum(v for k, v in r["status_counts"].items() if k.startswith("5"))
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 s per level")
    ap.add_argument("--soak", type=float, default=0, help="also run a soak of this many seconds at 64 connections")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-serving.json"))
    args = ap.parse_args()
    repeats, seconds = (1, 3.0) if args.quick else (3, 5.0)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["small_cnn"] = bench_model("small_cnn", work, repeats=repeats, seconds=seconds, threads=args.threads)
        print(json.dumps(results["small_cnn"], indent=1), flush=True)
        results["resnet18"] = bench_model("resnet18", work, repeats=1, seconds=seconds, threads=args.threads)
        print(json.dumps(results["resnet18"], indent=1), flush=True)
        if args.soak:
            results["soak"] = soak(work, args.soak, args.threads)
            print(json.dumps(results["soak"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
