"""Collecting an ImageFolder from S3 vs from local disk (issue 20: target S3 >= 0.7x the local speed).

Generates N JPEGs (32x32 RGB, 5 classes; offline), uploads them to a SeaweedFS S3 gateway on
loopback (``tests/s3server.py``) with boto3 in threads -- generation and upload are not timed --
then times ``collect_imagefolder`` (the function ``collect_data`` runs, fresh: ``incremental=False``)
on the local folder and on ``ObjectStoragePath("s3://...", conn_id=...)`` with an Airflow connection
given as ``AIRFLOW_CONN_<ID>``, alternating local / S3, ``--repeats`` times. Reports medians of wall
time, speed ratio (local seconds / S3 seconds; 1.0 = as fast), and CPU seconds per image of this
process + its decode workers and of the S3 server (on this machine they share the same cores).

    python bench/collect_s3.py [--n 50000] [--repeats 3] [--workers 2]

Writes bench/results/collect_s3.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SHAPE = (32, 32, 3)
CLASSES = 5
CONN_ID = "bench_s3"


def _write_range(args: tuple[str, int, int]) -> int:
    from PIL import Image

    root, start, stop = args
    rng = np.random.default_rng(start)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(start, stop):
        cls = i % CLASSES
        base = ((np.sin(xx / (2 + cls)) + np.cos(yy / (3 + cls))) * 60 + 128).astype(np.int16)
        img = np.clip(base[..., None] + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        d = Path(root) / f"class_{cls}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=85)
    return stop - start


def _cpu(pid: int | None = None) -> float:
    """CPU seconds of ``pid`` (from /proc), or of this process and its waited-for children."""
    if pid is None:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12]) + int(v[13]) + int(v[14])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: one per CPU)")
    ap.add_argument("--out", default=str(RESULTS / "collect_s3.json"))
    args = ap.parse_args()

    from tests import s3server

    work = Path(tempfile.mkdtemp(prefix="nightshift-collect-s3-"))
    src = work / "src"
    t = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_range, [(str(src), a, min(a + step, args.n)) for a in range(0, args.n, step)]))
    print(f"generated {args.n} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
    server = s3server.start(work / "seaweedfs")
    try:
        s3 = server.client()
        prefix = "bench-src"
        files = sorted(src.rglob("*.jpg"))
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda p: s3.put_object(Bucket=server.bucket, Key=f"{prefix}/{p.relative_to(src)}",
                                                  Body=p.read_bytes()), files))
        print(f"uploaded in {time.perf_counter() - t:.1f}s", flush=True)
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({
            "conn_type": "aws", "login": server.access_key, "password": server.secret_key,
            "extra": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}})

        from airflow.sdk import ObjectStoragePath

        from nightshift.data.collect import collect_imagefolder

        uri = f"s3://{server.bucket}/{prefix}"
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        digests = set()
        for rep in range(args.repeats):
            for kind in ("local", "s3"):
                root = src if kind == "local" else ObjectStoragePath(uri, conn_id=CONN_ID)
                out = work / f"snaps-{kind}-{rep}"
                c0, s0, t0 = _cpu(), _cpu(server.proc.pid), time.perf_counter()
                snap, stats = collect_imagefolder(root, SHAPE, out, workers=args.workers, incremental=False,
                                                  progress=lambda m: None)
                wall = time.perf_counter() - t0
                run = {"seconds": wall, "images": stats.decoded, "client_cpu_s": _cpu() - c0,
                       "server_cpu_s": _cpu(server.proc.pid) - s0}
                runs[kind].append(run)
                digests.add(snap.digest)
                shutil.rmtree(out, ignore_errors=True)
                print(f"repeat {rep + 1} {kind:5s}: {wall:6.2f}s ({stats.decoded / wall:6.0f} images/s), "
                      f"cpu {run['client_cpu_s']:.1f}s collector+workers, {run['server_cpu_s']:.1f}s S3 server",
                      flush=True)
        if len(digests) != 1:
            raise SystemExit(f"local and S3 collections differ: {digests}")

        def med(kind: str, k: str) -> float:
            return statistics.median(r[k] for r in runs[kind])

        local_s, s3_s = med("local", "seconds"), med("s3", "seconds")
        result = {
            "what": "collect_imagefolder, fresh (incremental=False), local folder vs s3:// via ObjectStoragePath",
            "n": args.n, "image": "32x32 RGB JPEG q85", "classes": CLASSES, "repeats": args.repeats,
            "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "s3_server": "SeaweedFS on loopback, same machine", "date": time.strftime("%Y-%m-%d"),
            "local_median_s": local_s, "s3_median_s": s3_s, "ratio": local_s / s3_s,
            "cpu_ms_per_image": {k: {"collector_and_workers": 1e3 * med(k, "client_cpu_s") / args.n,
                                     "s3_server": 1e3 * med(k, "server_cpu_s") / args.n} for k in runs},
            "runs": runs, "digest": digests.pop(),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"local {local_s:.2f}s, S3 {s3_s:.2f}s (medians of {args.repeats}): S3 speed = "
              f"{result['ratio']:.2f}x local (target >= 0.7x); wrote {args.out}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
