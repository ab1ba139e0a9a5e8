"""GPU training bench: the default recipe, resnet18 and the old recipe on a
CIFAR-shaped synthetic set, through the same ``nightshift.training.train()`` the
``train_gpu`` task calls. One command on a GPU machine (no Airflow needed):

    PYTHONPATH=plugins python bench/gpu_train.py --out gpu_train.json

The data: 50,000 training images 32×32×3 in 10 classes (plus val and test splits),
uint8, written as a real snapshot with ``write_snapshot``. Each class is a smooth
random colour pattern, weak next to a pattern all classes share; every image is
the two, plus a random share of another class's pattern, randomly mirrored,
shifted by up to 6 px (cyclic), with random contrast, brightness and noise, and
5% of labels are replaced at random (so the best possible accuracy is ~0.955;
linear classifiers get ~0.25): learnable, not trivial, so accuracy means something
(it is not comparable with CIFAR-10's).

Each configuration runs in its own process (fresh CUDA context, fair time to
first step) and reports: steady-state training images/s (median of the per-epoch
rates after the first epoch, CUDA-event timed), total training time, time to
first step (from ``train()``'s start: snapshot read, model build, data to the
device, compile, first step), test accuracy, GPU name and torch version. The
baseline is the old recipe (small_cnn, batch 128, AdamW, 12 epochs) measured in
the same run; the ratios are against it. JSON goes to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> hyperparameter overrides ({} = the defaults chosen for 32×32×3 images).
CONFIGS: dict[str, dict] = {
    "default": {},
    "default_compiled": {"compile": True},
    "resnet18": {"model": "resnet18"},
    # Keys that exist in the old DEFAULT_HPARAMS too, so --baseline-pythonpath can run the previous code.
    # 4 of its 12 epochs: enough for a steady rate; its accuracy is not comparable.
    "baseline_old_recipe": {"model": "small_cnn", "batch_size": 128, "lr": 3e-3, "width": 32, "epochs": 4},
}


def make_dataset(n: int, seed: int = 0, classes: int = 10, size: int = 32, label_noise: float = 0.05):
    """``(images uint8 [n, size, size, 3], labels int64 [n])``: see the module docstring."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.rand((classes + 1, 3, 6, 6), generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
    shared, specific = smooth[-1], smooth[:classes]
    labels = torch.randint(0, classes, (n,), generator=g)
    other = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    ar = torch.arange(size)
    for i in range(0, n, 4096):
        sl = slice(i, min(i + 4096, n))
        m = sl.stop - sl.start
        x = 1.2 * shared + 0.45 * specific[labels[sl]] + torch.rand((m, 1, 1, 1), generator=g) * specific[other[sl]]
        flip = torch.rand(m, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        dy, dx = (torch.randint(-6, 7, (m, 1), generator=g) for _ in range(2))  # per-image cyclic shifts
        rows, cols = (ar.view(1, -1) - dy) % size, (ar.view(1, -1) - dx) % size
        x = x[torch.arange(m).view(m, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1),
              rows.view(m, 1, size, 1), cols.view(m, 1, 1, size)]
        contrast = 0.4 + 0.8 * torch.rand((m, 1, 1, 1), generator=g)
        bright = 0.3 + 0.4 * torch.rand((m, 1, 1, 1), generator=g)
        x = contrast * x + bright + 0.35 * torch.randn(x.shape, generator=g)
        out[sl] = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    noisy = torch.rand(n, generator=g) < label_noise  # a known ceiling: ~1 - label_noise * 0.9
    labels = torch.where(noisy, torch.randint(0, classes, (n,), generator=g), labels)
    return out.numpy(), labels.numpy().astype(np.int64)


def build_snapshot(root: Path, n_train: int, seed: int):
    import numpy as np

    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import SourceData

    val_fraction, test_fraction = 0.02, 0.16
    n = int(round(n_train / (1 - val_fraction - test_fraction)))
    images, labels = make_dataset(n, seed)
    data = SourceData(images=images, labels=labels, class_names=[f"class{k}" for k in range(10)],
                      orig_sizes=np.tile([[32, 32, 3]], (n, 1)), origins=[f"synthetic:{i}" for i in range(n)],
                      source={"kind": "synthetic", "generator": "bench/gpu_train.py", "seed": seed})
    return write_snapshot(data, root, val_fraction=val_fraction, test_fraction=test_fraction)


def worker(snapshot_uri: str, name: str, hparams: dict, out_json: Path) -> None:
    """One training run in this process; writes its figures to ``out_json``."""
    import torch

    from nightshift.data.snapshot import load_snapshot
    from nightshift.training import train

    snap = load_snapshot(snapshot_uri)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = train(snap, tmp, hparams, require_gpu=True)
        wall = time.perf_counter() - t0
    rates = [h["train_images_per_second"] for h in r.history]
    steady = rates[1:] or rates
    m = r.metrics
    out_json.write_text(json.dumps({
        "name": name, "hparams": r.manifest["hparams"], "overrides": hparams,
        "steady_images_per_second": statistics.median(steady),
        "images_per_second_per_epoch": rates,
        "train_seconds": m["train_seconds"], "wall_seconds": wall,
        "first_step_seconds": m.get("first_step_seconds"),
        "test_accuracy": m["test_accuracy"], "test_accuracy_tta": m.get("test_accuracy_tta"),
        "epochs": len(r.history), "train_images": r.manifest["counts"]["train"],
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    }))


def run_config(snapshot_uri: str, name: str, hparams: dict, work: Path, pythonpath: str | None) -> dict:
    out = work / f"{name}.json"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--snapshot", snapshot_uri,
           "--hparams", json.dumps(hparams), "--worker-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_train.json"))
    ap.add_argument("--train-images", type=int, default=50_000)
    ap.add_argument("--configs", default="default,resnet18,baseline_old_recipe",
                    help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the default recipe (seeds 0..n-1)")
    ap.add_argument("--set", action="append", default=[], metavar="CONFIG.KEY=VALUE",
                    help="override a hyperparameter of one configuration, e.g. resnet18.epochs=5")
    ap.add_argument("--baseline-pythonpath", default=None,
                    help="PYTHONPATH for an extra run of the baseline with other code (e.g. the previous release)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", help=argparse.SUPPRESS)
    ap.add_argument("--hparams", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.snapshot, args.worker, json.loads(args.hparams), args.worker_out)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_train.py needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    configs = {k: dict(CONFIGS[k]) for k in args.configs.split(",")}
    for item in args.set:
        key, value = item.split("=", 1)
        cfg, hp = key.split(".", 1)
        configs.setdefault(cfg, {})[hp] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        snap = build_snapshot(work / "snapshots", args.train_images, seed=0)
        results["dataset"] = {"counts": {s: snap.count(s) for s in ("train", "val", "test")},
                              "build_seconds": time.perf_counter() - t0, "shape": list(snap.image_shape)}
        uri = str(snap.path)
        pp = os.environ.get("PYTHONPATH")
        for name, hp in configs.items():
            reps = args.repeats if name == "default" else 1
            for seed in range(reps):
                r = run_config(uri, name, {**hp, "seed": seed} if reps > 1 else hp, work, pp)
                results["runs"].append(r)
                print(json.dumps({k: r.get(k) for k in ("name", "steady_images_per_second", "train_seconds",
                                                        "first_step_seconds", "test_accuracy", "test_accuracy_tta",
                                                        "error")}), file=sys.stderr, flush=True)
        if args.baseline_pythonpath:
            r = run_config(uri, "baseline_previous_code", CONFIGS["baseline_old_recipe"], work,
                           args.baseline_pythonpath)
            results["runs"].append(r)
    summary: dict = {}
    for r in results["runs"]:
        if "error" in r:
            continue
        s = summary.setdefault(r["name"], {"steady_images_per_second": [], "train_seconds": [],
                                           "first_step_seconds": [], "test_accuracy": [], "test_accuracy_tta": []})
        for k in s:
            if r.get(k) is not None:
                s[k].append(r[k])
    results["summary"] = {n: {k: statistics.median(v) for k, v in s.items() if v} for n, s in summary.items()}
    base = results["summary"].get("baseline_old_recipe", {}).get("steady_images_per_second")
    if base:
        for s in results["summary"].values():
            s["speedup_vs_baseline"] = s["steady_images_per_second"] / base
    text = json.dumps(results, indent=1)
    args.out.write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
