"""Collecting an ImageFolder from S3 vs from local disk (issue 20: target S3 >= 0.7x the local speed).

Generates N JPEGs (32x32 RGB, 5 classes; offline) as class folders and the same tree as tar packs
of ``--pack-size`` members (``shard-NNNN.tar``), uploads both to a SeaweedFS S3 gateway on loopback
(``tests/s3server.py``) with boto3 in threads -- generation and upload are not timed -- then times
``collect_imagefolder`` (the function ``collect_data`` runs, fresh: ``incremental=False``) four ways,
alternating, ``--repeats`` times:

* ``local``: class folders on local disk into a local artifact root (the baseline);
* ``s3``: the same class folders on ``ObjectStoragePath("s3://...", conn_id=...)`` (an Airflow
  connection given as ``AIRFLOW_CONN_<ID>``) into an ``s3://`` artifact root (``nightshift.store``:
  every shard, the record and the pointer uploaded before the collection returns);
* ``local_packed`` and ``s3_packed``: the same, with the tar packs as the source.

Reports medians of wall time, speed ratios against ``local`` (local seconds / other seconds;
1.0 = as fast), and CPU seconds per image of this process + its decode workers and of the S3
server (on this machine they share the same cores). Every way must give the same data digest.

    python bench/collect_s3.py [--n 50000] [--repeats 3] [--workers 2] [--pack-size 1000]

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


def _write_packs(src: Path, dest: Path, pack_size: int) -> list[Path]:
    """``src``'s ``<class>/<image>`` files in name order, ``pack_size`` per uncompressed tar (GNU
    format: Python reads pax headers about 0.4 ms per member slower)."""
    import tarfile

    files = sorted(p for p in src.rglob("*.jpg"))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(0, len(files), pack_size):
        path = dest / f"shard-{k // pack_size:04d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for f in files[k:k + pack_size]:
                tar.add(f, arcname=f.relative_to(src).as_posix())
        out.append(path)
    return out


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
    ap.add_argument("--pack-size", type=int, default=1000, help="images per tar pack")
    ap.add_argument("--ways", default="local,s3,local_packed,s3_packed",
                    help="which ways to time, comma-separated (local is the baseline and always runs)")
    ap.add_argument("--out", default=str(RESULTS / "collect_s3.json"))
    args = ap.parse_args()

    from tests import s3server

    work = Path(tempfile.mkdtemp(prefix="nightshift-collect-s3-"))
    src = work / "src"
    t = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_range, [(str(src), a, min(a + step, args.n)) for a in range(0, args.n, step)]))
    packs = _write_packs(src, work / "packed", args.pack_size)
    print(f"generated {args.n} JPEGs and {len(packs)} packs in {time.perf_counter() - t:.1f}s", flush=True)
    server = s3server.start(work / "seaweedfs")
    try:
        s3 = server.client()
        prefix = "bench-src"
        files = sorted(src.rglob("*.jpg"))
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            if "s3" in args.ways.split(","):
                list(pool.map(lambda p: s3.put_object(Bucket=server.bucket, Key=f"{prefix}/{p.relative_to(src)}",
                                                      Body=p.read_bytes()), files))
            list(pool.map(lambda p: s3.put_object(Bucket=server.bucket, Key=f"bench-packed/{p.name}",
                                                  Body=p.read_bytes()), packs))
        print(f"uploaded in {time.perf_counter() - t:.1f}s", flush=True)
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({
            "conn_type": "aws", "login": server.access_key, "password": server.secret_key,
            "extra": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}})

        from airflow.sdk import ObjectStoragePath

        from nightshift.data.collect import collect_imagefolder
        from nightshift.store import open_store

        classes = [f"class_{k}" for k in range(CLASSES)]
        sources = {"local": src, "s3": ObjectStoragePath(f"s3://{server.bucket}/{prefix}", conn_id=CONN_ID),
                   "local_packed": work / "packed",
                   "s3_packed": ObjectStoragePath(f"s3://{server.bucket}/bench-packed", conn_id=CONN_ID)}
        ways = ["local", *[w for w in args.ways.split(",") if w in sources and w != "local"]]
        sources = {k: sources[k] for k in ways}
        runs: dict[str, list[dict]] = {k: [] for k in sources}
        digests = {}
        for rep in range(args.repeats):
            for kind, root in sources.items():
                out = work / f"snaps-{kind}-{rep}"
                # the S3 ways write into an s3:// artifact root, as collect_data does on the cluster
                store = (open_store(f"s3://{server.bucket}/artifacts-{kind}-{rep}", cache_dir=out, s3=server.options())
                         if kind.startswith("s3") else None)
                snaps = store.local_root / "snapshots" if store is not None else out / "snapshots"
                c0, s0, t0 = _cpu(), _cpu(server.proc.pid), time.perf_counter()
                snap, stats = collect_imagefolder(root, SHAPE, snaps, workers=args.workers, incremental=False,
                                                  class_names=classes, progress=lambda m: None, store=store)
                wall = time.perf_counter() - t0
                run = {"seconds": wall, "images": stats.decoded, "client_cpu_s": _cpu() - c0,
                       "server_cpu_s": _cpu(server.proc.pid) - s0}
                if store is not None:  # the record is in the object store, not only in the working copy
                    run["published"] = sorted(store.files("snapshots/collections"))[:1]
                    if not run["published"]:
                        raise SystemExit(f"{kind}: no collection record in {store.uri}")
                runs[kind].append(run)
                digests[kind] = snap.digest
                shutil.rmtree(out, ignore_errors=True)
                print(f"repeat {rep + 1} {kind:12s}: {wall:6.2f}s ({stats.decoded / wall:6.0f} images/s), "
                      f"cpu {run['client_cpu_s']:.1f}s collector+workers, {run['server_cpu_s']:.1f}s S3 server",
                      flush=True)
        if len(set(digests.values())) != 1:
            raise SystemExit(f"the collections differ: {digests}")

        def med(kind: str, k: str) -> float:
            return statistics.median(r[k] for r in runs[kind])

        local_s = med("local", "seconds")
        s3_s = med("s3", "seconds") if "s3" in runs else float("nan")
        result = {
            "what": "collect_imagefolder, fresh (incremental=False): local folder into a local artifact root vs "
                    "s3:// via ObjectStoragePath into an s3:// artifact root; class folders and tar packs",
            "n": args.n, "image": "32x32 RGB JPEG q85", "classes": CLASSES, "repeats": args.repeats,
            "pack_size": args.pack_size, "packs": len(packs),
            "median_s": {k: med(k, "seconds") for k in runs},
            "ratio_vs_local": {k: local_s / med(k, "seconds") for k in runs},
            "load_1m": os.getloadavg()[0],
            "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "s3_server": "SeaweedFS on loopback, same machine", "date": time.strftime("%Y-%m-%d"),
            "local_median_s": local_s, "s3_median_s": s3_s, "ratio": local_s / s3_s,
            "cpu_ms_per_image": {k: {"collector_and_workers": 1e3 * med(k, "client_cpu_s") / args.n,
                                     "s3_server": 1e3 * med(k, "server_cpu_s") / args.n} for k in runs},
            "runs": runs, "digest": digests["local"],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"medians of {args.repeats}: " + ", ".join(f"{k} {med(k, 'seconds'):.2f}s" for k in runs))
        print(f"S3 class folders = {result['ratio']:.2f}x local, S3 packs = {result['ratio_vs_local']['s3_packed']:.2f}x "
              f"local (target >= 0.7x); wrote {args.out}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
