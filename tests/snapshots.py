"""Small real snapshots for tests: the first images of a few classes of scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_subset_snapshot(root: Path, *, classes: int, per_class: int, val_fraction: float = 0.1,
                           test_fraction: float = 0.2, shard_mb: float | None = None):
    """A snapshot under ``root/snaps`` of ``per_class`` 8×8 digits of each of ``classes`` classes."""
    from sklearn.datasets import load_digits

    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import SourceData

    d = load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == k)[:per_class] for k in range(classes)])
    images = np.clip(np.rint(d.images[idx] * 255 / 16), 0, 255).astype(np.uint8)[..., None]
    n = len(idx)
    data = SourceData(images=images, labels=d.target[idx].astype(np.int64), class_names=[str(k) for k in range(classes)],
                      orig_sizes=np.tile([[8, 8, 1]], (n, 1)), origins=[f"digits:{i}" for i in idx],
                      source={"kind": "test"})
    kw = {} if shard_mb is None else {"shard_mb": shard_mb}
    return write_snapshot(data, Path(root) / "snaps", val_fraction=val_fraction, test_fraction=test_fraction, **kw)


def snapshot_content(snap) -> list[tuple]:
    """What a model could learn from a snapshot, independent of image order: (source, pixel
    hash, label, split) per image, sorted."""
    prof = snap.profile()
    return sorted(zip(prof["source"], prof["sha256"], prof["label_name"], prof["split"]))
