"""Data-path benchmarks at scale (issue "Data at production scale").

Makes its own synthetic JPEG ImageFolder (64×64 RGB, 10 classes; offline) and measures,
each as a ratio against a baseline from the same run (medians where repeated):

1. Peak RSS of collect + validate at N_LARGE vs N_SMALL images (32×32×3 snapshot), each
   in a fresh process: the collector's own peak and the decode workers' peak.
2. Decode throughput: 2 workers vs 1 (fresh collections, no reuse).
3. Re-collecting an unchanged folder vs its first collection, and adding 1,000 files.
4. Great Expectations validation and Evidently drift on the profile table at N_LARGE rows.
5. Training throughput streaming shards vs preloaded, same model and data (CPU here).

    python bench/data_scale.py [--large 200000] [--small 20000] [--recollect 50000]
    python bench/data_scale.py --render   # docs/benchmarks-data.md again from the committed results, no measuring

Writes bench/results/data_scale.json and renders docs/benchmarks-data.md from it, with the sections
of bench/results/gpu_stream.json (``--stream-only`` on a GPU machine) and bench/results/data_rss.json
(``bench/data_rss.py``) when those files exist. Every figure on that page comes from one of these files.
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
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks-data.md"
SHAPE = (32, 32, 3)


def _write_range(args: tuple[str, int, int]) -> int:
    from PIL import Image

    root, start, stop = args
    rng = np.random.default_rng(start)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(start, stop):
        cls = i % 10
        base = ((np.sin(xx / (3 + cls)) + np.cos(yy / (5 + cls))) * 60 + 128).astype(np.int16)
        img = np.clip(base[..., None] + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        d = Path(root) / f"class_{cls}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=85)
    return stop - start


def make_folder(root: Path, start: int, stop: int) -> None:
    step = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_range, [(str(root), a, min(a + step, stop)) for a in range(start, stop, step)]))


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from nightshift.data.collect import collect_imagefolder
from nightshift.quality import ValidationConfig, validate_snapshot
from pathlib import Path
t = time.perf_counter()
snap, stats = collect_imagefolder(Path(sys.argv[2]), (32, 32, 3), Path(sys.argv[3]), workers=int(sys.argv[4]),
                                  incremental=sys.argv[5] == "1")
t_collect = time.perf_counter() - t
collect_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
res = {"success": None}
if sys.argv[6] == "1":
    res = validate_snapshot(snap.profile(locations=False), snap.manifest, ValidationConfig(class_names=None, image_shape=(32, 32, 3)),
                            Path(sys.argv[3]) / "validation")
t_validate = time.perf_counter() - t
print(json.dumps({"collect_s": t_collect, "validate_s": t_validate, "stats": stats.to_dict(),
                  "valid": res["success"], "digest": snap.digest, "collection": str(snap.path),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "collect_peak_rss_mb": collect_peak,
                  "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def collect(folder: Path, snaps: Path, *, workers: int, incremental: bool = False, validate: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "plugins"), str(folder), str(snaps), str(workers),
                          "1" if incremental else "0", "1" if validate else "0"],
                         capture_output=True, text=True, env={**os.environ, "GX_ANALYTICS_ENABLED": "False"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_stream(work: Path, n: int = 12_000, repeats: int = 3, *, shard_mb: float = 8,
                 hparams: dict | None = None) -> dict:
    """Training images/s streaming 8 MiB shards vs the same split preloaded (interleaved repeats)."""
    import torch

    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import SourceData
    from nightshift.training import train

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 32, 32, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels % 3] += (labels[:, None, None] * 18).astype(np.uint8)
    data = SourceData(images=images, labels=labels.astype(np.int64), class_names=[str(i) for i in range(10)],
                      orig_sizes=np.tile([[32, 32, 3]], (n, 1)), origins=[f"synthetic:{i}" for i in range(n)],
                      source={"kind": "synthetic"})
    snap = write_snapshot(data, work / "stream-snaps", shard_mb=shard_mb)
    hp = hparams if hparams is not None else {"epochs": 2, "width": 16, "batch_size": 256}
    pre, stream = [], []
    for r in range(repeats):
        a = train(snap, work / f"pre{r}", {**hp, "preload_budget_mb": 10_000}, resume=False)
        b = train(snap, work / f"str{r}", {**hp, "preload_budget_mb": 0.01}, resume=False)
        assert a.manifest["data_feed"] == "preload" and b.manifest["data_feed"] == "stream"
        key = "steady_images_per_second" if "steady_images_per_second" in a.metrics else "train_images_per_second"
        pre.append(a.metrics[key])
        stream.append(b.metrics[key])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"n_train": snap.count("train"), "shards": len(snap.shard_digests), "device": device, "hparams": hp,
            "threads": torch.get_num_threads(), "preload_ips": statistics.median(pre),
            "stream_ips": statistics.median(stream), "ratio": statistics.median(stream) / statistics.median(pre),
            "repeats": repeats}


def gpu_stream_section() -> str:
    """The GPU streaming figure, measured on a GPU machine with ``--stream-only`` (bench/results/gpu_stream.json)."""
    f = RESULTS / "gpu_stream.json"
    if not f.is_file():
        return ""
    g = json.loads(f.read_text())
    return (f"\n## On a GPU\n\n`python bench/data_scale.py --stream-only --stream-n 60000 --repeats 2` on {g['device']}, "
            f"the default recipe ({g['hparams']}), {g['n_train']:,} training images 32×32×3 in {g['shards']} shards of "
            f"16 MiB, steady-state rate, median of {g['repeats']}: streaming {g['stream_ips']:,.0f} img/s vs preloaded "
            f"{g['preload_ips']:,.0f} img/s = **{g['ratio']:.2f}×** (target ≥ 0.9×).\n")


def rss_section(default_small_n: int, default_large_n: int) -> str:
    """The peak-RSS re-measurement by ``bench/data_rss.py`` (bench/results/data_rss.json)."""
    f = RESULTS / "data_rss.json"
    if not f.is_file():
        return ""
    d = json.loads(f.read_text())
    small_n, large_n = d.get("small_n", default_small_n), d.get("large_n", default_large_n)

    def med(s: str, key: str) -> float:
        return statistics.median(x[key] for x in d["runs"] if x["set"] == s)

    small, large = med("small", "peak_rss_mb"), med("large", "peak_rss_mb")
    w_small, w_large = med("small", "workers_peak_rss_mb"), med("large", "workers_peak_rss_mb")
    repeats = sorted({x["repeat"] for x in d["runs"]})
    per_run = [next(x["peak_rss_mb"] for x in d["runs"] if x["set"] == "large" and x["repeat"] == r)
               / next(x["peak_rss_mb"] for x in d["runs"] if x["set"] == "small" and x["repeat"] == r)
               for r in repeats]
    tree_small, tree_large = small + 2 * w_small, large + 2 * w_large
    tree_ratio = tree_large / tree_small
    return f"""
## Peak RSS re-measured

`python bench/data_rss.py <work>` ({d['date']}) runs this script's `collect()` (collect + validate, 2 workers)
on the {small_n:,} / {large_n:,}-image folders a `python bench/data_scale.py --work <work>` run left,
{len(repeats)} times each; raw figures in `bench/results/data_rss.json`.

| | {small_n:,} | {large_n:,} | ratio |
|---|---|---|---|
| collecting process, peak RSS (median of {len(repeats)}) | {small:.0f} MB | {large:.0f} MB | {large / small:.2f}× ({', '.join(f'{r:.2f}×' for r in per_run)}) |
| largest decode worker, peak RSS (median of {len(repeats)}) | {w_small:.0f} MB | {w_large:.0f} MB | {w_large / w_small:.2f}× |
| collector + 2 × largest worker (upper bound of the tree) | {tree_small:,.0f} MB | {tree_large:,.0f} MB | {tree_ratio:.2f}× |

`peak_rss_mb` is `RUSAGE_SELF` of the collecting process only; the decode workers are
separate processes (`RUSAGE_CHILDREN` gives the largest one). Counted with its workers,
collection {'stays under' if tree_large <= 1200 else 'goes over'} 1.2 GB and grows {tree_ratio:.2f}× for
{large_n / small_n:.0f}× the data ({'within' if tree_ratio <= 1.5 else 'missing'} the 1.5× target).
"""


def render(results: dict) -> str:
    """docs/benchmarks-data.md from a ``data_scale.json`` result (and the other results files, when present)."""
    r, d, c, p, t = (results["rss"], results["decode"], results["recollect"], results["profile_scale"],
                     results["stream"])
    m = results["machine"]
    md = f"""# Data-path benchmarks

Rendered by `bench/data_scale.py` from the committed results files (`python bench/data_scale.py --render`
renders it again without measuring). The table is `bench/results/data_scale.json`: measured by
`python bench/data_scale.py` on {m.get('arch', 'x86_64')}, Python {m['python']}, {m['cpus']} cores; {results['date']}.
Synthetic JPEG ImageFolder (64×64 RGB, 10 classes) collected into 32×32×3 snapshots with the default
64 MiB shards. Ratios against a baseline from the same run.

| what | baseline | measured | ratio | target |
|---|---|---|---|---|
| Peak RSS of collect + validate, {r['large_n']:,} vs {r['small_n']:,} images (collector process; 2 decode workers) | {r['small']['peak_rss_mb']:.0f} MB | {r['large']['peak_rss_mb']:.0f} MB | {r['ratio']:.2f}× | ≤ 1.5×, ≤ 1,200 MB |
| Decode workers' peak RSS (each), {r['large_n']:,} images | | {r['large']['workers_peak_rss_mb']:.0f} MB | | |
| Decode throughput, {d['n']:,} images: 2 workers vs 1 (median of {d['repeats']}) | {d['one_worker_ips']:,.0f} img/s | {d['two_workers_ips']:,.0f} img/s | {d['ratio']:.2f}× | ≥ 1.7× |
| Re-collecting an unchanged {c['n']:,}-image folder vs its first collection (median of {c['repeats']}) | {c['first_s']:.1f} s | {c['unchanged_s']:.2f} s | {c['ratio']:.1f}× faster | ≥ 10× |
| Adding {c['added']:,} files, then collecting again | | {c['added_s']:.1f} s, {c['added_decoded']:,} files decoded | | exactly {c['added']:,} |
| Great Expectations validation of the profile table ({p['rows']:,} rows) | | {p['validate_s']:.1f} s | | |
| Evidently drift, {p['drift_rows_each']:,} vs {p['drift_rows_each']:,} rows | | {p['drift_s']:.1f} s | | |
| Training throughput (small_cnn, {t['n_train']:,} images 32×32×3 in {t['shards']} shards, CPU): streaming vs preloaded (median of {t['repeats']}) | {t['preload_ips']:,.0f} img/s | {t['stream_ips']:,.0f} img/s | {t['ratio']:.2f}× | ≥ 0.9× |

Collect + validate of {r['large_n']:,} images took {r['large']['collect_s']:.0f} s + {r['large']['validate_s']:.0f} s
({r['large_n'] / r['large']['collect_s']:,.0f} images/s with 2 workers).

Raw: `{json.dumps(results)}`
"""
    return md + gpu_stream_section() + rss_section(r["small_n"], r["large_n"])


def write_doc(results: dict | None = None) -> str:
    """Render docs/benchmarks-data.md (from the committed data_scale.json when ``results`` is None)."""
    if results is None:
        results = json.loads((RESULTS / "data_scale.json").read_text())
    md = render(results)
    DOC.write_text(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--recollect", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--stream-only", action="store_true",
                    help="only the streaming-vs-preloaded training figure (e.g. on a GPU machine), as JSON")
    ap.add_argument("--stream-n", type=int, default=12_000)
    ap.add_argument("--render", action="store_true",
                    help="only render docs/benchmarks-data.md from the committed results files (no measuring)")
    args = ap.parse_args()
    if args.render:
        write_doc()
        return 0
    if args.stream_only:
        import torch

        hp = ({"epochs": 3} if torch.cuda.is_available() else None)  # the default recipe on a GPU
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(bench_stream(Path(tmp), n=args.stream_n, repeats=args.repeats, shard_mb=16,
                                          hparams=hp)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="nightshift-data-bench-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "arch": platform.machine()},
                     "date": time.strftime("%Y-%m-%d")}
    try:
        t = time.perf_counter()
        big = work / "big"
        marker = work / f".big-{args.large}.complete"
        if not marker.exists():  # --work keeps the generated folder between runs
            shutil.rmtree(big, ignore_errors=True)
            make_folder(big, 0, args.large)
            marker.touch()
        print(f"{args.large} JPEGs ready in {time.perf_counter() - t:.0f}s", flush=True)
        for d in ("small", "mid", "s-small", "s-large", "s-mid", "stream-snaps"):
            shutil.rmtree(work / d, ignore_errors=True)
        small = work / "small"
        small.mkdir()
        for d in sorted(big.iterdir()):  # the first files of each class: same image size
            (small / d.name).mkdir()
            for f in sorted(d.iterdir())[: args.small // 10]:
                os.link(f, small / d.name / f.name)

        # 1. peak RSS, collect + validate, 2 workers
        rss_small = collect(small, work / "s-small", workers=2, validate=True)
        rss_large = collect(big, work / "s-large", workers=2, validate=True)
        results["rss"] = {"small_n": args.small, "large_n": args.large, "small": rss_small, "large": rss_large,
                          "ratio": rss_large["peak_rss_mb"] / rss_small["peak_rss_mb"]}
        print("rss", json.dumps(results["rss"]), flush=True)

        # 2. decode throughput, 2 workers vs 1 (interleaved; fresh snapshot roots)
        one, two = [], []
        for r in range(args.repeats):
            a = collect(small, work / f"t1-{r}", workers=1)
            b = collect(small, work / f"t2-{r}", workers=2)
            one.append(args.small / a["collect_s"])
            two.append(args.small / b["collect_s"])
            shutil.rmtree(work / f"t1-{r}")
            shutil.rmtree(work / f"t2-{r}")
        results["decode"] = {"n": args.small, "one_worker_ips": statistics.median(one),
                             "two_workers_ips": statistics.median(two),
                             "ratio": statistics.median(two) / statistics.median(one), "repeats": args.repeats}
        print("decode", json.dumps(results["decode"]), flush=True)

        # 3. re-collecting an unchanged folder, then with 1,000 new files
        mid = work / "mid"
        mid.mkdir()
        for d in sorted(big.iterdir()):
            (mid / d.name).mkdir()
            for f in sorted(d.iterdir())[: args.recollect // 10]:
                os.link(f, mid / d.name / f.name)
        first = collect(mid, work / "s-mid", workers=2, incremental=True)
        again = [collect(mid, work / "s-mid", workers=2, incremental=True) for _ in range(args.repeats)]
        make_folder(mid, 10_000_000, 10_001_000)
        grown = collect(mid, work / "s-mid", workers=2, incremental=True)
        again_s = statistics.median(a["collect_s"] for a in again)
        results["recollect"] = {"n": args.recollect, "first_s": first["collect_s"], "unchanged_s": again_s,
                                "ratio": first["collect_s"] / again_s, "unchanged_decoded": again[0]["stats"]["decoded"],
                                "added": 1000, "added_decoded": grown["stats"]["decoded"], "added_s": grown["collect_s"],
                                "repeats": args.repeats}
        print("recollect", json.dumps(results["recollect"]), flush=True)

        # 4. GX validation and Evidently drift at the large row count
        sys.path.insert(0, str(ROOT / "plugins"))
        from nightshift.data.snapshot import load_snapshot
        from nightshift.drift import check_drift

        snap = load_snapshot(rss_large["collection"], verify=False)
        prof = snap.profile()
        half = len(prof) // 2
        t = time.perf_counter()
        drift = check_drift(prof.iloc[:half], prof.iloc[half:], work / "drift")
        results["profile_scale"] = {"rows": len(prof), "validate_s": rss_large["validate_s"],
                                    "drift_s": time.perf_counter() - t, "drift_rows_each": half,
                                    "drifted_share": drift["drifted_share"]}
        print("profile", json.dumps(results["profile_scale"]), flush=True)
        results["stream"] = bench_stream(work)
        print("stream", json.dumps(results["stream"]), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    md = write_doc(results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
