"""ONNX opset of the exported model: ONNX Runtime speed at the default opset vs opset 18.

    python bench/onnx_opset.py [--pairs 12] [--seconds 0.7]   # bench/results/onnx_opset.json + its docs section
    python bench/onnx_opset.py --render                        # only rewrite the docs section from the JSON

The same random-weight classifier (``small_cnn`` and ``resnet18`` on 32x32x3, as
``bench/serving.py`` builds them) is exported twice by ``nightshift.export``:
at opset 18 and at ``DEFAULT_OPSET``. From opset 20 torch emits ``nn.GELU`` as
ONNX's one ``Gelu`` node; at 18 it is Div/Erf/Add/Mul/Mul, which ONNX Runtime does
not fuse. Both graphs run in one process on the server's session options (one
intra-op thread, no spinning); each pair measures both, in alternating order, and
the figure is the median of the per-pair ratios (default over 18), at batch 1 and 16.
Both exports must give the same outputs (max |difference| of the logits is recorded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

SHAPE = (32, 32, 3)


def export(arch: str, opset: int, out: Path) -> Path:
    from serving import export_model  # bench/serving.py: the model the serving bench uses

    return export_model(arch, out / f"opset{opset}", opset) / "model.onnx"


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rate(sess, x: np.ndarray, seconds: float) -> float:
    """Images per second of ``sess.run`` on ``x``."""
    sess.run(None, {"pixels": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"pixels": x})
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


SECTION = "## ONNX opset of the exported model"


def render(r: dict) -> str:
    """The docs/benchmarks.md section for a results dict."""
    rows = []
    for arch, e in r["models"].items():
        ops18, opsd = e["ops"]["18"], e["ops"][str(r["default_opset"])]
        for b in (1, 16):
            f = e[f"batch{b}"]
            rows.append(f"| {arch} | {b} | {f['images_per_s']['18']:,.0f}/s | "
                        f"{f['images_per_s'][str(r['default_opset'])]:,.0f}/s | **{f['ratio']:.2f}×** "
                        f"({f['quartiles'][0]:.2f}–{f['quartiles'][1]:.2f}) | "
                        f"{sum(ops18.values())} → {sum(opsd.values())} | {e['max_abs_diff_logits']:.1e} |")
    d = r["default_opset"]
    return f"""{SECTION} (`bench/onnx_opset.py`, {r['date']})

The same random-weight classifier exported by `nightshift.export` at opset 18 and at
the default {d}, run in one process on the server's session options (1 intra-op thread,
no spinning); images per second of `session.run`, median of {r['pairs']} alternating pairs
of {r['seconds']} s each (quartiles of the per-pair ratios in brackets).

| model | batch | opset 18 | opset {d} | opset {d} / 18 | graph nodes | max \|Δ logits\| |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

From opset 20 torch writes `nn.GELU` as ONNX's one `Gelu` node, which ONNX Runtime
runs inside its blocked (NCHWc) convolution layout; at 18 each GELU is
Div/Erf/Add/Mul/Mul, which ONNX Runtime does not fuse, with a layout reorder around
it. So the default opset is {d}: small_cnn (six GELUs) gains, resnet18 (ReLU) does not
change. A faster model also makes the serving overhead a larger share of each
request: the serving ratios below are against this faster baseline.
"""


def main() -> int:
    import onnx

    from nightshift.export import DEFAULT_OPSET

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=0.7)
    ap.add_argument("--models", default="small_cnn,resnet18")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_opset.json"))
    ap.add_argument("--render", action="store_true", help="only rewrite the docs section from --out")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only")
    args = ap.parse_args()
    from docs_section import write_section

    if args.render:
        write_section(SECTION, render(json.loads(Path(args.out).read_text())), before="## Serving under load")
        return 0
    if DEFAULT_OPSET == 18:
        raise SystemExit("DEFAULT_OPSET is 18: nothing to compare")
    rng = np.random.default_rng(1)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "default_opset": DEFAULT_OPSET, "baseline_opset": 18,
                 "pairs": args.pairs, "seconds": args.seconds, "threads": 1, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            paths = {op: export(arch, op, Path(tmp)) for op in (18, DEFAULT_OPSET)}
            sess = {op: session(p) for op, p in paths.items()}
            probe = rng.integers(0, 256, (16, *SHAPE), dtype=np.uint8)
            logits = {op: s.run(None, {"pixels": probe})[0] for op, s in sess.items()}
            entry = {"ops": {op: dict(Counter(n.op_type for n in onnx.load(p).graph.node)) for op, p in paths.items()},
                     "max_abs_diff_logits": float(np.abs(logits[18] - logits[DEFAULT_OPSET]).max())}
            for batch in (1, 16):
                x = rng.integers(0, 256, (batch, *SHAPE), dtype=np.uint8)
                ratios, rates = [], {18: [], DEFAULT_OPSET: []}
                for i in range(args.pairs):
                    order = (18, DEFAULT_OPSET) if i % 2 == 0 else (DEFAULT_OPSET, 18)
                    got = {op: rate(sess[op], x, args.seconds) for op in order}
                    for op, v in got.items():
                        rates[op].append(v)
                    ratios.append(got[DEFAULT_OPSET] / got[18])
                q = statistics.quantiles(ratios, n=4)
                entry[f"batch{batch}"] = {
                    "ratio": round(statistics.median(ratios), 3), "quartiles": [round(q[0], 3), round(q[2], 3)],
                    "images_per_s": {str(op): round(statistics.median(v), 1) for op, v in rates.items()},
                    "ratios": [round(r, 3) for r in ratios]}
                print(f"{arch} batch {batch}: opset {DEFAULT_OPSET} / 18 = {entry[f'batch{batch}']['ratio']}x "
                      f"(quartiles {entry[f'batch{batch}']['quartiles']}), "
                      f"{entry[f'batch{batch}']['images_per_s']} img/s", flush=True)
            out["models"][arch] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_docs:
        write_section(SECTION, render(out), before="## Serving under load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
