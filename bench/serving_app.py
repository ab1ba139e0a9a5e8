"""The serving app's own CPU per infer request, without HTTP and without the model.

    python bench/serving_app.py [--rounds 9] [--requests 5000]   # writes bench/results/serving_app.json

Drives :class:`serving.app.InferenceApp` as an ASGI callable on one uvloop
event loop, with the request already received (``receive`` returns the whole
binary body) and the model's ``predict`` replaced by a copy of fixed outputs:
what is left is the app's own work per request (routing, reading the body,
parsing and validating the OIP request, the batcher's inline path, encoding the
answer, metrics). Two apps run in alternating rounds, the request-plan cache on
(``plan_cache_size=256``) and off (``0``); the figure is the median of the
per-round ratios off / on, so drift of the shared cores cancels in each round.

This is the part of a served request's CPU that the code controls; uvicorn,
the kernel and the model are the rest (``bench/serving_cpu.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "plugins"))

from serving import MODELS, SHAPE, export_model  # noqa: E402  (bench/serving.py)


def make_app(model_dir: Path, plan_cache_size: int):
    from nightshift.serving.app import AppConfig, InferenceApp
    from nightshift.serving.model import Model

    model = Model(model_dir, intra_op_threads=1)
    model.load()
    x = np.zeros((1, *SHAPE), np.uint8)
    fixed = model.predict(x)
    model.predict = lambda pixels: {k: v.copy() for k, v in fixed.items()}  # the app only, not the model
    app = InferenceApp(model, AppConfig(instances=1, plan_cache_size=plan_cache_size))
    app.batcher.concurrent_requests = lambda: 1  # one request in flight: the inline path, as at c=1
    return app


def scope_and_body(app) -> tuple[dict, bytes]:
    from nightshift.loadgen import infer_request

    x = np.random.default_rng(2).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    raw = infer_request("http://127.0.0.1:8080", app.model.name, x)
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
    scope = {"type": "http", "method": "POST", "path": f"/v2/models/{app.model.name}/infer",
             "headers": [(k.lower(), v) for k, v in headers], "client": ("127.0.0.1", 1), "query_string": b""}
    return scope, body


async def per_request_us(app, scope: dict, body: bytes, n: int) -> float:
    """CPU microseconds per request over ``n`` requests (after the caller's warm-up)."""
    statuses: list[int] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        if msg["type"] == "http.response.start":
            statuses.append(msg["status"])

    t0 = time.process_time()
    for _ in range(n):
        await app(scope, receive, send)
    cpu = time.process_time() - t0
    if set(statuses) != {200}:
        raise SystemExit(f"the app answered {sorted(set(statuses))}, not 200: the benchmark is broken")
    return cpu / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--requests", type=int, default=5000, help="requests per app per round")
    ap.add_argument("--models", help="use DIR/small_cnn/model.onnx instead of exporting")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_app.json"))
    args = ap.parse_args()
    MODELS["dir"] = Path(args.models) if args.models else None
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model("small_cnn", Path(tmp))
        apps = {"on": make_app(model_dir, 256), "off": make_app(model_dir, 0)}
        scope, body = scope_and_body(apps["on"])

        async def run() -> dict[str, list[float]]:
            for app in apps.values():
                app.startup()
                await per_request_us(app, scope, body, 500)  # warm-up
            us: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(args.rounds):
                for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    us[side].append(await per_request_us(apps[side], scope, body, args.requests))
                print(f"round {i + 1}/{args.rounds}: off {us['off'][-1]:.1f} us  on {us['on'][-1]:.1f} us",
                      flush=True)
            for app in apps.values():
                app.shutdown()
            return us

        us = uvloop.run(run())
    hits = apps["on"]._plans.hits
    if hits < args.rounds * args.requests:
        raise SystemExit(f"the plan cache was hit {hits} times, expected every request after the first")
    ratios = [off / on for off, on in zip(us["off"], us["on"], strict=True)]
    result = {"date": time.strftime("%Y-%m-%d"), "model": "small_cnn (predict replaced by fixed outputs)",
              "rounds": args.rounds, "requests_per_round": args.requests,
              "us_per_request_cache_off": round(statistics.median(us["off"]), 1),
              "us_per_request_cache_on": round(statistics.median(us["on"]), 1),
              "off_over_on_median": round(statistics.median(ratios), 3),
              "off_over_on_range": [round(min(ratios), 3), round(max(ratios), 3)]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
