"""Content-addressed pixel shards: fixed-size blocks of uint8 NHWC images with
their labels and splits.

A shard lives in ``<snapshots root>/shards/<digest>/`` (``images.npy``,
``labels.npy``, ``splits.npy``, ``shard.json``), is written once through a
temporary folder and a rename, and is never modified: any number of
collections, nights and readers share it. Its digest is the sha256 of its
shape, pixels, labels and splits, and readers check it before first use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nightshift.artifacts import atomic_dir
from nightshift.errors import DataError

SHARDS_DIR = "shards"
#: Default shard size. 64 MiB of pixels: large enough that reading is sequential
#: and per-shard overhead (a file open, a digest, one host→device copy of a few
#: ms) is negligible; small enough that a collector holds two at once and a
#: trainer streams with double buffering in a few hundred MB.
DEFAULT_SHARD_MB = 64
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def capacity(shape: tuple[int, int, int], shard_mb: float) -> int:
    """Images per shard for ``shard_mb`` MiB of pixels (at least 1)."""
    h, w, c = shape
    if shard_mb <= 0:
        raise DataError(f"shard_mb must be positive, got {shard_mb}")
    return max(1, int(shard_mb * 2**20) // (h * w * c))


def shard_digest(images: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "labels": "<i8", "splits": "<U5"}).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype="<i8").data)
    h.update("\n".join(splits.tolist()).encode())
    return h.hexdigest()


def _disk_error(exc: OSError, where: Path) -> DataError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(where if where.exists() else where.parent).free if where.parent.exists() else 0
        return DataError(f"disk full while writing snapshot data under {where} ({free / 2**20:.0f} MiB free): "
                         "nothing partial was kept; free space or point NIGHTSHIFT_ARTIFACT_ROOT elsewhere, "
                         "then retry the task")
    return DataError(f"could not write snapshot data under {where}: {exc}")


def write_shard(root: Path, images: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> str:
    """Write one shard (or find it already there); return its digest."""
    digest = shard_digest(images, labels, splits)
    final = root / SHARDS_DIR / digest
    if (final / "shard.json").is_file():
        return digest
    try:
        with atomic_dir(final, replace=final.exists()) as tmp:
            np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
            np.save(tmp / "splits.npy", np.asarray(splits, dtype="<U5"))
            (tmp / "shard.json").write_text(json.dumps(
                {"digest": digest, "count": int(len(labels)), "image_shape": list(images.shape[1:])}) + "\n")
    except OSError as exc:
        raise _disk_error(exc, root / SHARDS_DIR) from exc
    return digest


class ShardWriter:
    """Packs images into fixed-capacity shards, holding at most one shard of pixels.

    :param on_shard: called with ``(digest, count)`` after each shard is on disk
        (collection journals its progress there).
    """

    def __init__(self, root: Path, shape: tuple[int, int, int], shard_capacity: int,
                 on_shard: Callable[[str, int], None] | None = None):
        self.root = Path(root)
        self.shape = shape
        self.capacity = shard_capacity
        self.on_shard = on_shard
        h, w, c = shape
        self._images = np.empty((shard_capacity, h, w, c), np.uint8)
        self._labels = np.empty(shard_capacity, np.int64)
        self._splits = np.empty(shard_capacity, "<U5")
        self._n = 0
        self.written: list[tuple[str, int]] = []

    def add(self, images: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> list[tuple[int, int]]:
        """Append images; returns ``(shard position in self.written, row)`` for each.

        The shard position refers to :attr:`written` once the shard is flushed.
        """
        where = []
        i = 0
        while i < len(images):
            take = min(self.capacity - self._n, len(images) - i)
            self._images[self._n:self._n + take] = images[i:i + take]
            self._labels[self._n:self._n + take] = labels[i:i + take]
            self._splits[self._n:self._n + take] = splits[i:i + take]
            where.extend((len(self.written), self._n + k) for k in range(take))
            self._n += take
            i += take
            if self._n == self.capacity:
                self.flush()
        return where

    def flush(self) -> None:
        if self._n == 0:
            return
        n = self._n
        digest = write_shard(self.root, self._images[:n], self._labels[:n], self._splits[:n])
        self.written.append((digest, n))
        self._n = 0
        if self.on_shard:
            self.on_shard(digest, n)


@dataclass
class Shard:
    digest: str
    images: np.ndarray  # memory-mapped
    labels: np.ndarray
    splits: np.ndarray


#: Shards whose content matched their digest in this process, keyed by the digest, the
#: folder and each file's identity (inode, size, mtime): a shard is never modified, so a
#: file replaced or rewritten since (restored from a backup, edited, another root with
#: the same digest) is checked again rather than trusted from an earlier check.
_verified: set[tuple[str, str, tuple[tuple[int, int, int], ...]]] = set()
_verified_lock = threading.Lock()
_SHARD_FILES = ("images.npy", "labels.npy", "splits.npy")


def _identity(folder: Path) -> tuple[tuple[int, int, int], ...]:
    stats = [os.stat(folder / name) for name in _SHARD_FILES]
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def open_shard(root: Path, digest: str, *, verify: bool = True) -> Shard:
    """Open a shard (images memory-mapped). The first open in a process checks its digest.

    :raises DataError: the shard is missing or its content does not match its digest.
    """
    folder = Path(root) / SHARDS_DIR / digest
    if not (folder / "shard.json").is_file():
        raise DataError(f"shard {digest} is missing ({folder}): the snapshot's pixel data was deleted or moved; "
                        "collect the data again (re-run collect_data)")
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
        splits = np.load(folder / "splits.npy")
    except (OSError, ValueError) as exc:
        raise DataError(f"shard {digest} ({folder}) cannot be read: {exc}; collect the data again") from exc
    if verify:
        try:
            key = (digest, str(folder.resolve()), _identity(folder))
        except OSError as exc:
            raise DataError(f"shard {digest} ({folder}) cannot be read: {exc}; collect the data again") from exc
        if key not in _verified:
            actual = shard_digest(images, labels, splits)
            if actual != digest:
                raise DataError(f"shard {digest} ({folder}) is corrupt: its content hashes to {actual}. "
                                "Delete the folder and collect the data again")
            with _verified_lock:
                _verified.add(key)
    return Shard(digest=digest, images=images, labels=labels, splits=splits)
