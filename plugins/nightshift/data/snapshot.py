"""Dataset snapshots: content-addressed pixel data plus one record per collection.

Layout and column meanings: ``docs/architecture.md``. Two kinds of folder live
under the snapshots root:

* ``pixels/<data digest>/`` — the decoded images, labels and splits. Named by
  the sha256 of exactly that content (and the class names and shape), written
  atomically and never modified, so identical data collected twice is stored
  once. Its digest is the *data digest* that training, export and the
  registry record.
* ``collections/<collection id>/`` — what one collection saw: its source, the
  files it could not decode, every image's origin (in the profile table) and
  when it ran. Every collection writes its own record, even when its pixels
  are identical to an earlier one, so nothing that validation reads is ever
  an earlier collection's fact. The id is the sha256 of the record itself.

A :class:`Snapshot` is a collection record joined with its pixel data; its
``path`` is the collection folder (what ``collect_data`` passes on XCom).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.artifacts import atomic_dir, read_json
from nightshift.data.sources import SourceData
from nightshift.errors import DataError

#: Layout version of collection records and pixel folders. Format 1 (one
#: ``snapshots/<digest>/`` folder holding both) is refused with a clear message.
FORMAT = 2
SPLITS = ("train", "val", "test")
PIXELS_DIR = "pixels"
COLLECTIONS_DIR = "collections"


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
    """One collection (``path``, ``manifest``) and the pixel data it points at."""

    path: Path
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        """The data digest: sha256 of pixels, labels, splits, class names and shape."""
        return self.manifest["digest"]

    @property
    def collection_id(self) -> str:
        return self.manifest["collection_id"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])  # type: ignore[return-value]

    @property
    def pixels_path(self) -> Path:
        return (self.path / self.manifest["pixels"]).resolve()

    @cached_property
    def images(self) -> np.ndarray:
        return np.load(self.pixels_path / "images.npy", mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.pixels_path / "labels.npy")

    @cached_property
    def splits(self) -> np.ndarray:
        return np.load(self.pixels_path / "splits.npy")

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one split, images as an in-memory uint8 array."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        mask = self.splits == name
        return np.ascontiguousarray(self.images[mask]), self.labels[mask]

    def profile(self):
        import pandas as pd

        return pd.read_parquet(self.path / "profile.parquet")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def write_snapshot(data: SourceData, snapshots_root: str | Path, *, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, collected_at: datetime | None = None,
                   context: dict[str, Any] | None = None) -> Snapshot:
    """Record one collection of ``data`` under ``snapshots_root``.

    The pixel data goes to ``pixels/<data digest>/`` unless identical data is
    already there (then it is shared); the collection's own record —
    ``manifest.json`` and ``profile.parquet`` with this collection's source,
    undecodable files, origins and time — always goes to a new
    ``collections/<collection id>/``.

    :param collected_at: the collection time recorded (default: now, UTC).
    :param context: free-form facts about who collected (e.g. DAG and run id),
        stored in the manifest.
    """
    root = Path(snapshots_root)
    hashes = pixel_hashes(data.images)
    splits = assign_splits(hashes, val_fraction=val_fraction, test_fraction=test_fraction,
                           predefined=data.predefined_split)
    labels = data.labels.astype(np.int64)
    digest = compute_digest(data.images, labels, splits, data.class_names)

    pixels = root / PIXELS_DIR / digest
    if not (pixels / "pixels.json").is_file():
        # A concurrent writer of the same digest wins harmlessly; a folder without
        # pixels.json (not written by this code) is replaced.
        with atomic_dir(pixels, replace=pixels.exists()) as tmp:
            np.save(tmp / "images.npy", np.ascontiguousarray(data.images, dtype=np.uint8))
            np.save(tmp / "labels.npy", labels)
            np.save(tmp / "splits.npy", splits)
            (tmp / "pixels.json").write_text(json.dumps(
                {"format": FORMAT, "digest": digest, "image_shape": list(data.images.shape[1:]),
                 "class_names": list(data.class_names), "count": int(len(labels))}, indent=2) + "\n")

    counts = {
        "total": int(len(labels)),
        "per_split": {s: int((splits == s).sum()) for s in SPLITS},
        "per_class": {name: int((labels == i).sum()) for i, name in enumerate(data.class_names)},
        "undecodable": len(data.undecodable),
    }
    profile = build_profile(data.images, labels, splits, data.class_names, data.orig_sizes, data.origins, hashes)
    origins_digest = hashlib.sha256("\n".join(data.origins).encode("utf-8")).hexdigest()
    record = {
        "format": FORMAT,
        "digest": digest,
        "source": data.source,
        "class_names": list(data.class_names),
        "image_shape": list(data.images.shape[1:]),
        "counts": counts,
        "undecodable": data.undecodable,
        "origins_sha256": origins_digest,
        "split": {"method": "sha256-of-pixels", "val_fraction": val_fraction, "test_fraction": test_fraction,
                  "predefined_test": data.predefined_split is not None},
        "collected_at": (collected_at or datetime.now(timezone.utc)).isoformat(),
        "context": context or {},
        # Two collections in the same instant with the same facts still get their own record.
        "nonce": uuid.uuid4().hex,
    }
    collection_id = hashlib.sha256(_canonical_json(record)).hexdigest()
    final = root / COLLECTIONS_DIR / collection_id
    manifest = {**record, "collection_id": collection_id,
                "pixels": str(Path("..") / ".." / PIXELS_DIR / digest)}
    with atomic_dir(final) as tmp:
        profile.to_parquet(tmp / "profile.parquet", index=False)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return load_snapshot(final)


def load_snapshot(path: str | Path) -> Snapshot:
    """Open a collection record and check that its pixel data is there.

    :raises DataError: not a snapshot, an older format, or its pixel data is missing
        or is not the data the record names.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a Nightshift snapshot (no manifest.json)")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"snapshot {path} has format {manifest.get('format')}, this Nightshift reads format {FORMAT}: "
            "collect the data again (re-run collect_data, or trigger nightly_retrain) to write it in the current format"
        )
    snap = Snapshot(path=path, manifest=manifest)
    pixels_meta = snap.pixels_path / "pixels.json"
    if not pixels_meta.is_file():
        raise DataError(f"snapshot {path} points at pixel data {snap.pixels_path} that does not exist "
                        f"(data digest {snap.digest[:12]}); it was deleted or moved: collect the data again")
    if read_json(pixels_meta).get("digest") != snap.digest:
        raise DataError(f"pixel data {snap.pixels_path} is not the data snapshot {path} was collected with "
                        f"(expected digest {snap.digest})")
    return snap
