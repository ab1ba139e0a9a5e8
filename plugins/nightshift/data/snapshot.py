"""Content-addressed dataset snapshots and their per-image profile table.

Layout and column meanings: ``docs/architecture.md``. A snapshot folder is named
by the sha256 of its content, written atomically, and never modified afterwards,
so any number of runs can read it and a retried collect is a no-op.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.artifacts import atomic_dir, read_json
from nightshift.data.sources import SourceData
from nightshift.errors import DataError

FORMAT = 1
SPLITS = ("train", "val", "test")


def pixel_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def assign_splits(hashes: list[str], *, val_fraction: float, test_fraction: float,
                  predefined: np.ndarray | None = None) -> np.ndarray:
    """Deterministic split from each image's content hash.

    An image keeps its split as the dataset grows night after night, and identical
    images always share one split. Where the source fixes a test split (torchvision),
    that is kept and only its training part is divided into train/val.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"invalid split fractions val={val_fraction} test={test_fraction}")
    u = np.array([int(h[:8], 16) / 2**32 for h in hashes], dtype=np.float64)
    out = np.full(len(hashes), "train", dtype="<U5")
    if predefined is not None:
        out[predefined == "test"] = "test"
        trainable = predefined != "test"
        out[trainable & (u < val_fraction)] = "val"
        return out
    out[u < test_fraction] = "test"
    out[(u >= test_fraction) & (u < test_fraction + val_fraction)] = "val"
    return out


def compute_digest(images: np.ndarray, labels: np.ndarray, splits: np.ndarray, class_names: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "shape": list(images.shape), "classes": class_names}).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(labels.astype("<i8").tobytes())
    h.update("\n".join(splits.tolist()).encode())
    return h.hexdigest()


def build_profile(images: np.ndarray, labels: np.ndarray, splits: np.ndarray, class_names: list[str],
                  orig_sizes: np.ndarray, origins: list[str], hashes: list[str]):
    """The per-image profile table (pandas DataFrame); vectorised over the batch."""
    import pandas as pd

    n, h, w, c = images.shape
    flat = images.reshape(n, -1).astype(np.float32)
    data: dict[str, Any] = {
        "image_id": np.arange(n, dtype=np.int64),
        "sha256": hashes,
        "split": splits,
        "label": labels.astype(np.int64),
        "label_name": [class_names[i] if 0 <= i < len(class_names) else None for i in labels],
        "orig_height": orig_sizes[:, 0].astype(np.int64),
        "orig_width": orig_sizes[:, 1].astype(np.int64),
        "orig_channels": orig_sizes[:, 2].astype(np.int64),
        "height": np.full(n, h, np.int64),
        "width": np.full(n, w, np.int64),
        "channels": np.full(n, c, np.int64),
        "brightness": flat.mean(axis=1).astype(np.float64),
        "contrast": flat.std(axis=1).astype(np.float64),
    }
    ch_means = images.reshape(n, -1, c).astype(np.float32).mean(axis=1) if n else np.zeros((0, c))
    for k in range(c):
        data[f"mean_ch{k}"] = ch_means[:, k].astype(np.float64)
    data["source"] = origins
    return pd.DataFrame(data)


@dataclass
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])  # type: ignore[return-value]

    @cached_property
    def images(self) -> np.ndarray:
        return np.load(self.path / "images.npy", mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.path / "labels.npy")

    @cached_property
    def splits(self) -> np.ndarray:
        return np.load(self.path / "splits.npy")

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one split, images as an in-memory uint8 array."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        mask = self.splits == name
        return np.ascontiguousarray(self.images[mask]), self.labels[mask]

    def profile(self):
        import pandas as pd

        return pd.read_parquet(self.path / "profile.parquet")


def write_snapshot(data: SourceData, snapshots_root: str | Path, *, val_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> Snapshot:
    """Write ``data`` as a content-addressed snapshot under ``snapshots_root``."""
    hashes = pixel_hashes(data.images)
    splits = assign_splits(hashes, val_fraction=val_fraction, test_fraction=test_fraction,
                           predefined=data.predefined_split)
    labels = data.labels.astype(np.int64)
    digest = compute_digest(data.images, labels, splits, data.class_names)
    final = Path(snapshots_root) / digest
    counts = {
        "total": int(len(labels)),
        "per_split": {s: int((splits == s).sum()) for s in SPLITS},
        "per_class": {name: int((labels == i).sum()) for i, name in enumerate(data.class_names)},
        "undecodable": len(data.undecodable),
    }
    manifest = {
        "format": FORMAT,
        "digest": digest,
        "source": data.source,
        "class_names": list(data.class_names),
        "image_shape": list(data.images.shape[1:]),
        "counts": counts,
        "undecodable": data.undecodable,
        "split": {"method": "sha256-of-pixels", "val_fraction": val_fraction, "test_fraction": test_fraction,
                  "predefined_test": data.predefined_split is not None},
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if final.exists():  # same content already collected: reuse it untouched
        return load_snapshot(final)
    profile = build_profile(data.images, labels, splits, data.class_names, data.orig_sizes, data.origins, hashes)
    with atomic_dir(final) as tmp:
        np.save(tmp / "images.npy", np.ascontiguousarray(data.images, dtype=np.uint8))
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "splits.npy", splits)
        profile.to_parquet(tmp / "profile.parquet", index=False)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return load_snapshot(final)


def load_snapshot(path: str | Path) -> Snapshot:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a Nightshift snapshot (no manifest.json)")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"snapshot {path} has format {manifest.get('format')}, this Nightshift reads {FORMAT}")
    return Snapshot(path=path, manifest=manifest)
