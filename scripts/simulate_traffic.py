"""Send normal or shifted images to the served champion, to watch drift be detected.

    . scripts/env.sh
    python scripts/simulate_traffic.py --mode normal  --n 600      # looks like the training data
    python scripts/simulate_traffic.py --mode darker  --n 600      # brightness shift
    python scripts/simulate_traffic.py --mode rotated --n 600      # rotated 90°
    python scripts/simulate_traffic.py --mode classmix --n 600     # only two classes arrive
    # then trigger drift_monitor for the window (or wait for the hourly run)

Images come from the champion's own snapshot (its val and test splits, i.e.
data the model did not train on), found through the MLflow registry, or from
``--snapshot <collection folder>``. Requests go to the stable serving port on
127.0.0.1 (``--url``) through the Open Inference Protocol (JSON), a bounded
number of them, and the script stops by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))


def shifted(images: np.ndarray, labels: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    if mode == "normal":
        return images
    if mode == "darker":
        return (images.astype(np.float32) * 0.4).astype(np.uint8)
    if mode == "rotated":
        return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    if mode == "classmix":
        keep = np.isin(labels, np.unique(labels)[:2])
        if not keep.any():
            raise SystemExit("classmix: no images of the first two classes")
        idx = rng.choice(np.flatnonzero(keep), size=len(images))
        return images[idx]
    raise SystemExit(f"unknown mode {mode!r}")


def load_images(args) -> tuple[np.ndarray, np.ndarray, str]:
    from nightshift.data.snapshot import load_snapshot

    from nightshift.settings import Settings

    store = Settings.from_env().store()  # the champion's snapshot may be an s3:// URI (cluster profile)
    if args.snapshot:
        snap = load_snapshot(args.snapshot, store=store)
    else:
        from nightshift import registry

        s = Settings.from_env()
        champion = registry.get_champion(registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri), args.model)
        if champion is None:
            raise SystemExit(f"{args.model} has no champion: run nightly_retrain first (make run)")
        snap = load_snapshot(champion["tags"]["nightshift.snapshot_uri"], store=store)
    parts = [snap.split(name) for name in ("val", "test")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), str(snap.path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8600", help="the stable serving URL (loopback)")
    ap.add_argument("--model", default="nightshift-digits")
    ap.add_argument("--mode", choices=["normal", "darker", "rotated", "classmix"], default="normal")
    ap.add_argument("--n", type=int, default=600, help="images to send (at most 100,000)")
    ap.add_argument("--batch", type=int, default=8, help="images per request")
    ap.add_argument("--snapshot", help="a collection folder to draw images from (default: the champion's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be a loopback address (127.0.0.0/8, localhost or [::1])")
    import requests

    rng = np.random.default_rng(args.seed)
    images, labels, source = load_images(args)
    n = max(1, min(args.n, 100_000))
    pick = rng.integers(0, len(images), size=n)
    batch_images = shifted(images[pick], labels[pick], args.mode, rng)
    url = f"{args.url.rstrip('/')}/v2/models/{args.model}/infer"
    sent = errors = 0
    classes: dict[str, int] = {}
    t0 = time.perf_counter()
    with requests.Session() as http:
        http.trust_env = False
        for lo in range(0, n, args.batch):
            x = batch_images[lo:lo + args.batch]
            body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                "data": x.reshape(-1).tolist()}],
                    "outputs": [{"name": "label"}]}
            try:
                r = http.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=10)
                r.raise_for_status()
                for out in r.json()["outputs"]:
                    if out["name"] == "label":
                        for c in out["data"]:
                            classes[c] = classes.get(c, 0) + 1
                sent += len(x)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors += 1
                if errors <= 3:
                    print(f"request failed: {exc}", file=sys.stderr)
    dt = time.perf_counter() - t0
    print(json.dumps({"mode": args.mode, "sent": sent, "failed_requests": errors, "seconds": round(dt, 2),
                      "predicted": dict(sorted(classes.items())), "source": source, "url": url}))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
