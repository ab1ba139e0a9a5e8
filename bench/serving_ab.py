"""Compare two server configurations under the same load, with little noise.

    python bench/serving_ab.py --b NIGHTSHIFT_MAX_QUEUE_DELAY_MS=0 [--a ENV=V,...] [--concurrency 16]

Both servers (``python -m serving.server``, one set of environment variables each)
run at once and idle in turn; short loads (``--seconds``, 1 s) alternate between
them, A then B, then B then A, for ``--pairs`` pairs. The figure is the median of the
per-pair throughput ratios B / A with its quartiles. Adjacent loads share the
machine's state of the moment, so drift on shared cores (±20% between runs of
``bench/serving.py``) cancels in each pair. This is how the changes quoted in
``docs/benchmarks.md`` ("tried ... kept/dropped") were measured. Writes
``bench/results/serving_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving as bench  # noqa: E402  (bench/serving.py)


def parse_env(spec: str) -> dict[str, str]:
    """``"A=1,B=2"`` -> ``{"A": "1", "B": "2"}``; empty: no variables (the defaults)."""
    env = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.startswith("NIGHTSHIFT_"):
            raise SystemExit(f"--a/--b: expected NIGHTSHIFT_NAME=VALUE[,...], got {part!r}")
        env[name] = value
    return env


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="", help="server A's environment, NIGHTSHIFT_X=V,... (default: none)")
    ap.add_argument("--b", required=True, help="server B's environment, NIGHTSHIFT_X=V,...")
    ap.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet18"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per instance (both servers)")
    ap.add_argument("--instances", type=int, default=0, help="model instances (0: one per CPU; both servers)")
    ap.add_argument("--models", help="use DIR/<arch>/model.onnx instead of exporting")
    ap.add_argument("--out", default=str(bench.ROOT / "bench" / "results" / "serving_ab.json"))
    args = ap.parse_args()
    env_a, env_b = parse_env(args.a), parse_env(args.b)
    bench.MODELS["dir"] = Path(args.models) if args.models else None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench.export_model(args.arch, Path(tmp))
        servers = {"A": bench.ServerProcess(model_dir, args.threads, args.instances, **env_a)}
        try:
            servers["B"] = bench.ServerProcess(model_dir, args.threads, args.instances, **env_b)
            ratios, errors = [], 0
            for i in range(args.pairs):
                rps = {}
                for side in (("A", "B") if i % 2 == 0 else ("B", "A")):
                    r = bench.load(servers[side].url, args.arch, args.concurrency, args.seconds)
                    errors += r["errors"] + r["timeouts"]
                    rps[side] = r["throughput_rps"]
                if rps["A"] and rps["B"]:
                    ratios.append(rps["B"] / rps["A"])
                print(f"pair {i + 1}/{args.pairs}: A {rps['A']:.0f}/s  B {rps['B']:.0f}/s", flush=True)
        finally:
            for s in servers.values():
                s.stop()
    if not ratios:
        raise SystemExit("no pair had answers on both servers")
    q1, med, q3 = quartiles(ratios)
    result = {"date": time.strftime("%Y-%m-%d"), "arch": args.arch, "concurrency": args.concurrency,
              "a": env_a, "b": env_b, "pairs": len(ratios), "seconds": args.seconds,
              "b_over_a_median": round(med, 4), "b_over_a_quartiles": [round(q1, 4), round(q3, 4)],
              "ratios": [round(v, 4) for v in ratios], "errors_and_timeouts": errors}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.arch} c={args.concurrency}: B/A median {med:.3f} (quartiles {q1:.3f}..{q3:.3f}) over "
          f"{len(ratios)} pairs; errors + timeouts {errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
