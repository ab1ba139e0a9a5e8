"""Dataset snapshots: content-addressed pixel shards plus one record per collection.

Layout and column meanings: ``docs/architecture.md``. Under the snapshots root:

* ``shards/<shard digest>/`` — fixed-size blocks of decoded images with their
  labels and splits (:mod:`nightshift.data.shards`), written once and shared by
  every collection and night whose data contains exactly that block.
* ``collections/<collection id>/`` — what one collection saw: its source, the
  files it could not decode, every image's origin and file identity (in the
  profile table), its shards in order, and when it ran. Every collection writes
  its own record, even when its pixels are identical to an earlier one, so
  nothing that validation reads is ever an earlier collection's fact. The id
  is the sha256 of the record itself.
* ``sources/<source key>.json`` — the latest collection of each source and
  shape, which incremental collection starts from.

With an object-store artifact root (:mod:`nightshift.store`) the snapshots root is a
working copy: :func:`publish_snapshot` uploads a collection (shards first, then its
record, then the source pointer) and :func:`fetch_snapshot` brings one back on another
worker (the record, then only the shards the cache does not hold verified).

A :class:`Snapshot` is a collection record joined with its shards; its
``path`` is the collection folder (what ``collect_data`` passes on XCom). Its
``digest`` (the *data digest*) is the sha256 of the shape, class names and the
ordered shard digests: everything a model trained on it learns from.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nightshift.artifacts import atomic_dir, atomic_write_json, read_json
from nightshift.data.shards import (
    DEFAULT_SHARD_MB,
    SHARDS_DIR,
    ShardWriter,
    capacity,
    open_shard,
)
from nightshift.data.sources import SourceData
from nightshift.errors import DataError

#: Layout version. Format 1 (one ``snapshots/<digest>/`` folder with every
#: image in one array) is refused with a message saying to collect again.
FORMAT = 2
SPLITS = ("train", "val", "test")
COLLECTIONS_DIR = "collections"
SOURCES_DIR = "sources"


def pixel_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def assign_splits(hashes: list[str], *, val_fraction: float, test_fraction: float,
                  predefined: np.ndarray | None = None) -> np.ndarray:
    """Deterministic split from each image's content hash.

    An image keeps its split as the dataset grows night after night, and identical
    images always share one split. Where the source fixes a test split (torchvision),
    that is kept and only its training part is divided into train/val.
    """
    check_fractions(val_fraction, test_fraction)
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


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"invalid split fractions val={val_fraction} test={test_fraction}: each in [0, 1), "
                        "together below 1")


def data_digest(shape: tuple[int, int, int] | list[int], class_names: list[str], shard_digests: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "shape": list(shape), "classes": list(class_names)}).encode())
    for d in shard_digests:
        h.update(d.encode())
    return h.hexdigest()


def source_key(source: dict[str, Any], shape: tuple[int, int, int] | list[int]) -> str:
    """Names the incremental state of one source read at one shape, decoded by this decoder:
    our resize code (``DECODER_VERSION``) and Pillow with its JPEG library, whose upgrades change
    decoded pixels; pixels decoded by another version are not reused."""
    import PIL
    from PIL import features

    from nightshift.data.decode import DECODER_VERSION

    ident = {k: source.get(k) for k in ("kind", "root", "name")}
    decoder = {"nightshift": DECODER_VERSION, "pillow": PIL.__version__, "jpeg": features.version("jpg")}
    return hashlib.sha256(json.dumps({"source": ident, "shape": list(shape), "decoder": decoder},
                                     sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Snapshot:
    """One collection (``path``, ``manifest``) and the shards it points at."""

    path: Path
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        """The data digest: sha256 of shape, class names and the ordered shard digests."""
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
    def root(self) -> Path:
        """The snapshots root (the shards live under it)."""
        return self.path.parent.parent

    @property
    def shard_digests(self) -> list[str]:
        return [s["digest"] for s in self.manifest["shards"]]

    def shard(self, index: int):
        return open_shard(self.root, self.shard_digests[index])

    def count(self, split: str | None = None) -> int:
        if split is None:
            return int(self.manifest["counts"]["total"])
        return int(self.manifest["counts"]["per_split"][split])

    def iter_split(self, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(images, labels)`` of one split, one shard at a time (bounded memory)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        for i in range(len(self.shard_digests)):
            sh = self.shard(i)
            mask = sh.splits == name
            if mask.any():
                yield np.ascontiguousarray(sh.images[mask]), sh.labels[mask]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one split as one in-memory uint8 array (preloading)."""
        n = self.count(name)
        h, w, c = self.image_shape
        images = np.empty((n, h, w, c), np.uint8)
        labels = np.empty(n, np.int64)
        at = 0
        for x, y in self.iter_split(name):
            images[at:at + len(y)] = x
            labels[at:at + len(y)] = y
            at += len(y)
        if at != n:
            raise DataError(f"snapshot {self.path} says its {name} split has {n} images but its shards hold {at}")
        return images, labels

    @cached_property
    def images(self) -> np.ndarray:
        """Every image in shard order (in memory: for small snapshots and tests)."""
        parts = [self.shard(i).images for i in range(len(self.shard_digests))]
        h, w, c = self.image_shape
        return np.concatenate(parts) if parts else np.zeros((0, h, w, c), np.uint8)

    @cached_property
    def labels(self) -> np.ndarray:
        parts = [self.shard(i).labels for i in range(len(self.shard_digests))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def profile(self, columns: list[str] | None = None, *, locations: bool = True):
        """The per-image profile table.

        :param locations: include ``shard``, ``row``, ``file_size`` and ``file_mtime``
            (where the pixels are, what the file was); validation and drift do not
            need them, and leaving them out saves memory at 10^6 rows.
        """
        import pandas as pd

        path = self.path / "profile.parquet"
        if columns is None and not locations:
            import pyarrow.parquet as pq

            drop = {"shard", "row", "file_size", "file_mtime"}
            columns = [c for c in pq.read_schema(path).names if c not in drop]
        return pd.read_parquet(path, columns=columns)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def profile_frame(meta: dict[str, Any], class_names: list[str]):
    """The profile table from per-image columns (see ``docs/architecture.md``)."""
    import pandas as pd

    n = len(meta["label"])
    labels = np.asarray(meta["label"], np.int64)
    data: dict[str, Any] = {
        "image_id": np.arange(n, dtype=np.int64),
        "sha256": meta["sha256"],
        "split": np.asarray(meta["split"], dtype=object),
        "label": labels,
        "label_name": [class_names[i] if 0 <= i < len(class_names) else None for i in labels],
    }
    orig = np.asarray(meta["orig_size"], np.int64).reshape(-1, 3)
    data.update({"orig_height": orig[:, 0], "orig_width": orig[:, 1], "orig_channels": orig[:, 2]})
    h, w, c = meta["shape"]
    data.update({"height": np.full(n, h, np.int64), "width": np.full(n, w, np.int64),
                 "channels": np.full(n, c, np.int64)})
    for col in ["brightness", "contrast", *[f"mean_ch{k}" for k in range(c)]]:
        data[col] = np.asarray(meta[col], np.float64)
    data["source"] = meta["source"]
    data["shard"] = np.asarray(meta["shard"], np.int64)
    data["row"] = np.asarray(meta["row"], np.int64)
    for col in ("file_size", "file_mtime"):
        if col in meta:
            data[col] = meta[col]
    return pd.DataFrame(data)


def build_profile(images: np.ndarray, labels: np.ndarray, splits: np.ndarray, class_names: list[str],
                  orig_sizes: np.ndarray, origins: list[str], hashes: list[str] | None = None):
    """The profile table of in-memory images (one shard's rows, in order)."""
    from nightshift.data.decode import image_stats

    stats = image_stats(images)
    if hashes is not None:
        stats["sha256"] = list(hashes)
    n = len(images)
    return profile_frame({**stats, "label": labels, "split": splits, "orig_size": orig_sizes, "source": list(origins),
                          "shard": np.zeros(n, np.int64), "row": np.arange(n), "shape": images.shape[1:]},
                         class_names)


def write_record(root: Path, *, shards: list[tuple[str, int]], meta: dict[str, Any], class_names: list[str],
                 shape: tuple[int, int, int], source: dict[str, Any], undecodable: list[dict[str, str]],
                 split_cfg: dict[str, Any], extra: dict[str, Any] | None = None,
                 collected_at: datetime | None = None, context: dict[str, Any] | None = None) -> "Snapshot":
    """Write a collection record for ``shards`` + per-image ``meta``; return the snapshot."""
    digests = [d for d, _ in shards]
    digest = data_digest(shape, class_names, digests)
    labels = np.asarray(meta["label"], np.int64)
    splits = np.asarray(meta["split"])
    counts = {
        "total": int(len(labels)),
        "per_split": {s: int((splits == s).sum()) for s in SPLITS},
        "per_class": {name: int((labels == i).sum()) for i, name in enumerate(class_names)},
        "undecodable": len(undecodable),
    }
    origins_digest = hashlib.sha256("\n".join(map(str, meta["source"])).encode("utf-8")).hexdigest()
    record = {
        "format": FORMAT,
        "digest": digest,
        "source": source,
        "class_names": list(class_names),
        "image_shape": list(shape),
        "counts": counts,
        "undecodable": undecodable,
        "origins_sha256": origins_digest,
        "shards": [{"digest": d, "count": int(n)} for d, n in shards],
        "split": split_cfg,
        "collected_at": (collected_at or datetime.now(timezone.utc)).isoformat(),
        "context": context or {},
        **(extra or {}),
        # Two collections in the same instant with the same facts still get their own record.
        "nonce": uuid.uuid4().hex,
    }
    collection_id = hashlib.sha256(_canonical_json(record)).hexdigest()
    final = Path(root) / COLLECTIONS_DIR / collection_id
    manifest = {**record, "collection_id": collection_id}
    profile = profile_frame({**meta, "shape": shape}, class_names)
    try:
        with atomic_dir(final) as tmp:
            profile.to_parquet(tmp / "profile.parquet", index=False)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    except OSError as exc:
        from nightshift.data.shards import _disk_error

        raise _disk_error(exc, final.parent) from exc
    return load_snapshot(final, verify=False)


def set_latest(root: Path, key: str, snap: "Snapshot") -> None:
    atomic_write_json(Path(root) / SOURCES_DIR / f"{key}.json",
                      {"collection_id": snap.collection_id, "digest": snap.digest,
                       "collected_at": snap.manifest["collected_at"]})


def latest(root: Path, key: str) -> "Snapshot | None":
    """The latest collection of a source (see :func:`source_key`), if it is still readable."""
    pointer = Path(root) / SOURCES_DIR / f"{key}.json"
    if not pointer.is_file():
        return None
    try:
        return load_snapshot(Path(root) / COLLECTIONS_DIR / read_json(pointer)["collection_id"], verify=False)
    except (DataError, KeyError, ValueError):
        return None  # an unreadable previous state only means "decode everything"


def write_snapshot(data: SourceData, snapshots_root: str | Path, *, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, shard_mb: float = DEFAULT_SHARD_MB,
                   collected_at: datetime | None = None, context: dict[str, Any] | None = None) -> Snapshot:
    """Record one collection of in-memory ``data`` (bundled, torchvision, tests).

    Pixels go to content-addressed shards (shared when identical); the
    collection's own record always goes to a new ``collections/<id>/``. Large
    ImageFolder sources use :func:`nightshift.data.collect.collect_imagefolder`,
    which streams instead.
    """
    from nightshift.data.decode import image_stats

    root = Path(snapshots_root)
    check_fractions(val_fraction, test_fraction)
    shape = tuple(int(v) for v in data.images.shape[1:])
    stats = image_stats(data.images)
    splits = assign_splits(stats["sha256"], val_fraction=val_fraction, test_fraction=test_fraction,
                           predefined=data.predefined_split)
    labels = data.labels.astype(np.int64)
    writer = ShardWriter(root, shape, capacity(shape, shard_mb))  # type: ignore[arg-type]
    where = writer.add(data.images, labels, splits)
    writer.flush()
    meta = {**stats, "label": labels, "split": splits, "orig_size": data.orig_sizes, "source": list(data.origins),
            "shard": [s for s, _ in where], "row": [r for _, r in where]}
    split_cfg = {"method": "sha256-of-pixels", "val_fraction": val_fraction, "test_fraction": test_fraction,
                 "predefined_test": data.predefined_split is not None}
    return write_record(root, shards=writer.written, meta=meta, class_names=data.class_names,
                        shape=shape, source=data.source, undecodable=data.undecodable,  # type: ignore[arg-type]
                        split_cfg=split_cfg, collected_at=collected_at, context=context,
                        extra={"shard_mb": shard_mb, "incremental": {"decoded": len(labels), "reused": 0}})


def load_snapshot(path: str | Path, *, verify: bool = True, store: Any = None) -> Snapshot:
    """Open a collection record and check that its shards are there.

    :param verify: also check each shard's content against its digest (once per
        process and shard).
    :param store: the artifact store (:class:`nightshift.store.Store`) ``path`` is a URI of:
        the collection is fetched first (:func:`fetch_snapshot`). None: ``path`` is local.
    :raises DataError: not a snapshot, an older format, or a shard is missing or corrupt.
    :raises StoreError: the store cannot give the record or a shard (names the URI).
    """
    if store is not None:
        path = fetch_snapshot(store, path)
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
    missing = [k for k in ("digest", "collection_id", "shards", "class_names", "image_shape", "counts")
               if k not in manifest]
    if missing:
        raise DataError(f"snapshot {path} (format {FORMAT}) lacks {missing} in its manifest: it was written by a "
                        "development version of Nightshift; collect the data again (re-run collect_data)")
    snap = Snapshot(path=path, manifest=manifest)
    for d in snap.shard_digests:
        open_shard(snap.root, d, verify=verify)
    return snap


# --------------------------------------------------------------------------- object-store root


def fetch_snapshot(store: Any, uri: str | Path) -> Path:
    """The local folder of the collection at ``uri`` in ``store``'s working copy, with every
    shard it lists (:class:`nightshift.store.Store`). A local root: the path itself, no I/O.

    On an object store the record (``manifest.json``, ``profile.parquet``) is downloaded
    (sha256-verified); a shard is downloaded only when the cache does not already hold it
    with content matching its digest (shards are content-addressed).

    :raises DataError: ``uri`` is not under the store, or the record is not a snapshot.
    :raises StoreError: the record or a shard cannot be read from the store (names the URI).
    """
    if not store.remote:
        return store.to_local(uri)
    rel = store.rel(uri)
    if not rel:
        raise DataError(f"snapshot {uri} is not in the artifact store {store.uri} (expected "
                        f"{store.uri}/snapshots/{COLLECTIONS_DIR}/<id>, collect_data's snapshot_uri)")
    local = store.fetch(uri)
    manifest_path = local / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{store.to_uri(local)} is not a Nightshift snapshot (no manifest.json)")
    manifest = read_json(manifest_path)
    root = local.parent.parent
    for entry in manifest.get("shards") or []:
        digest = str(entry["digest"])
        try:
            open_shard(root, digest, verify=True)  # cached and intact: nothing to download
            continue
        except DataError:
            pass
        store.fetch(store.to_uri(root / SHARDS_DIR / digest))
    return local


def publish_snapshot(store: Any, snap: Snapshot) -> str:
    """Upload a collection to ``store``: its shards, then its record, then (when the working
    copy's source pointer names this collection) ``sources/<key>.json``; return the record's
    URI. Readers never see a record whose shards are not there yet, nor a pointer to a
    record that is not. A local root: the path itself, no I/O.

    :raises StoreError: an upload failed (names the URI).
    """
    if not store.remote:
        return str(snap.path)
    root = snap.root
    for digest in snap.shard_digests:
        store.publish(root / SHARDS_DIR / digest)
    uri = store.publish(snap.path)
    source = snap.manifest.get("source")
    if isinstance(source, dict) and source.get("kind") == "imagefolder":
        pointer = root / SOURCES_DIR / f"{source_key(source, snap.image_shape)}.json"
        try:
            names_this = read_json(pointer).get("collection_id") == snap.collection_id
        except (OSError, ValueError, AttributeError):
            names_this = False
        if names_this:
            store.publish(pointer)
    return uri


def fetch_latest(store: Any, root: Path, key: str) -> None:
    """Bring the source pointer ``sources/<key>.json`` and the collection it names from
    ``store`` into the working copy at ``root`` (the snapshots root), so :func:`latest` finds
    the previous collection of a source on a worker that never saw it. Nothing there, or a
    previous collection that cannot be fetched, only means decoding everything (logged).
    A local root: nothing to do.
    """
    if not store.remote:
        return
    import logging

    from nightshift.store import StoreError

    pointer = Path(root) / SOURCES_DIR / f"{key}.json"
    try:
        local = store.fetch(store.to_uri(pointer), required=False)
        if not local.is_file():
            return
        cid = read_json(local)["collection_id"]
        fetch_snapshot(store, store.to_uri(Path(root) / COLLECTIONS_DIR / str(cid)))
    except (StoreError, DataError, KeyError, ValueError, TypeError) as exc:
        logging.getLogger(__name__).warning(
            "the previous collection of this source cannot be fetched from %s (%s): decoding every file",
            store.to_uri(pointer), exc)
