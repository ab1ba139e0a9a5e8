"""Streaming, parallel, incremental collection of an ImageFolder into a snapshot.

:func:`collect_imagefolder` lists the source, decides per file whether its
pixels can be reused, decodes only the rest in worker processes, and packs
everything into content-addressed shards while holding at most one shard of
pixels plus the chunks in flight.

**Reuse rule** (incremental collection). A file is not decoded again when the
latest collection of the *same source read at the same shape and decoder
version* (:func:`nightshift.data.snapshot.source_key`) listed the same relative
path with the same size and modification time (object storage: size and
ETag/last-modified). Its pixels are copied from that collection's shard. Labels
and splits are always recomputed from today's classes and split fractions, so
a reused shard is kept whole only when its labels and splits still match.

**Packs** (``<name>.tar`` of ``<class>/<image>`` members, beside or instead of class
folders: one request per pack instead of one per image on object storage). A pack is
fetched whole and unpacked by a decode worker; its members' rows read
``<pack>::<class>/<image>`` and carry the pack's size and stamp. A pack is reused all or
nothing: when its size and stamp are unchanged, a finished collection holds every one of
its members, and none of them was undecodable then.

**Killed and retried.** Every shard written is recorded in a journal
(``staging/<source key>/<shard>.parquet``); a retried collection reuses the
pixels of finished shards exactly like those of the previous night, and
removes the journal when it has written its record. Shards and records are
written through a temporary folder and a rename, so nothing is ever half there.
On an object-store artifact root each finished shard and then its journal entry
are uploaded as they are written, so a retry on *another* worker (an empty
working copy) fetches the journal and the shards it names instead of decoding
those files again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nightshift.data import decode
from nightshift.data.shards import DEFAULT_SHARD_MB, SHARDS_DIR, ShardWriter, capacity, open_shard
from nightshift.data.snapshot import (
    Snapshot,
    assign_splits,
    check_fractions,
    fetch_latest,
    latest,
    publish_snapshot,
    set_latest,
    source_key,
    write_record,
)
from nightshift.data.sources import FileEntry, list_imagefolder, read_many
from nightshift.errors import DataError

log = logging.getLogger(__name__)

STAGING_DIR = "staging"
#: Files per decode task: large enough to amortise inter-process transfer,
#: small enough that a few chunks in flight stay a few MB.
CHUNK_FILES = 256
#: Object storage: chunks fetched ahead of the decoders (each one ``cat`` of CHUNK_FILES objects).
READ_AHEAD = 2
_STAT_COLS = ("sha256", "brightness", "contrast")


def default_workers() -> int:
    """``NIGHTSHIFT_COLLECT_WORKERS`` decode workers when set, else one per CPU this process may use."""
    setting = os.environ.get("NIGHTSHIFT_COLLECT_WORKERS", "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise DataError(f"NIGHTSHIFT_COLLECT_WORKERS={setting!r}: expected a whole number of decode processes >= 1")
        return int(setting)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class CollectStats:
    listed: int = 0
    decoded: int = 0
    reused: int = 0
    undecodable: int = 0
    packs: int = 0
    shards_reused: int = 0
    shards_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Columns:
    """Per-image columns, appended chunk by chunk as numpy arrays (compact at 10^6 rows).

    Also a FIFO: :meth:`take` removes the first ``n`` rows (for the shard journal).
    """

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def append(self, cols: dict[str, Any]) -> None:
        # Strings stay Python objects (shared, ~1 pointer each) rather than fixed-width
        # numpy unicode (4 bytes per character per row): this table is O(images).
        part = {k: v if isinstance(v, np.ndarray) and v.dtype.kind != "U" else
                np.asarray(v, dtype=object if _is_text(v) else None) for k, v in cols.items()}
        n = {len(v) for v in part.values()}
        if len(n) != 1:
            raise ValueError(f"columns of unequal length: { {k: len(v) for k, v in part.items()} }")
        if n.pop():
            self.parts.append(part)

    def __len__(self) -> int:
        return sum(len(next(iter(p.values()))) for p in self.parts)

    def take(self, n: int) -> dict[str, np.ndarray]:
        out: list[dict[str, np.ndarray]] = []
        while n > 0:
            head = self.parts[0]
            size = len(next(iter(head.values())))
            if size <= n:
                out.append(self.parts.pop(0))
                n -= size
            else:
                out.append({k: v[:n] for k, v in head.items()})
                self.parts[0] = {k: v[n:] for k, v in head.items()}
                n = 0
        return _concat(out)

    def all(self) -> dict[str, np.ndarray]:
        return _concat(self.parts)


def _is_text(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "USO"
    return bool(len(v)) and isinstance(next(iter(v)), str)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _work_items(entries: list[FileEntry]) -> list[list[FileEntry]]:
    """``entries`` in order as decode tasks: runs of loose files in chunks of ``CHUNK_FILES``, and each
    pack alone (one read, unpacked by the worker)."""
    items: list[list[FileEntry]] = []
    run: list[FileEntry] = []
    for e in entries:
        if e.pack:
            if run:
                items.append(run)
                run = []
            items.append([e])
        else:
            run.append(e)
            if len(run) == CHUNK_FILES:
                items.append(run)
                run = []
    if run:
        items.append(run)
    return items


def _task(item: list[FileEntry], shape: tuple[int, int, int], classes: list[str],
          blobs: list[Any] | None = None) -> tuple[Callable, tuple]:
    """The decode function and arguments of one work item, read from local disk by the worker or
    already fetched (``blobs``): module-level functions of :mod:`nightshift.data.decode`, so a
    worker process imports only that module."""
    if item[0].pack:
        if blobs is None:
            return decode.decode_pack_file, (str(item[0].path), shape, classes)
        return decode.decode_pack, (blobs[0], shape, classes)
    if blobs is None:
        return decode.decode_files, ([str(e.path) for e in item], shape)
    return decode.decode_blobs, (blobs, shape)


def _iter_chunks(entries: list[FileEntry], shape: tuple[int, int, int], workers: int,
                 io_concurrency: int, classes: list[str] | None = None) -> Iterator[tuple[list[FileEntry], decode.Chunk]]:
    """Decode ``entries`` in chunks (a pack is a chunk of its own), in order, with a bounded number
    of chunks in flight."""
    classes = list(classes or [])
    chunks = _work_items(entries)
    local = all(isinstance(e.path, (str, Path)) for e in entries)
    if workers <= 1 and local:
        for ch in chunks:
            fn, fn_args = _task(ch, shape, classes)
            yield ch, fn(*fn_args)
        return
    from nightshift.data.workers import worker_context

    # spawn, not fork: the collector may run inside an Airflow task process with threads;
    # and workers that never run the parent's main script (there, the `airflow` entry point).
    ctx = worker_context()
    # object storage: whole chunks (or one pack) are fetched (concurrent requests, sources.read_many)
    # by two threads, up to READ_AHEAD chunks ahead of the decoders; bytes held: those chunks + in flight
    io_pool = None if local else ThreadPoolExecutor(max_workers=2, thread_name_prefix="collect-read")
    reads: deque[tuple[list[FileEntry], Future]] = deque()

    def submissions(pool: ProcessPoolExecutor) -> Iterator[tuple[list[FileEntry], Future]]:
        for ch in chunks:
            if local:
                fn, fn_args = _task(ch, shape, classes)
                yield ch, pool.submit(fn, *fn_args)
                continue
            reads.append((ch, io_pool.submit(read_many, [e.path for e in ch], io_concurrency)))  # type: ignore[union-attr]
            if len(reads) > READ_AHEAD:
                ready, fetched = reads.popleft()
                fn, fn_args = _task(ready, shape, classes, fetched.result())
                yield ready, pool.submit(fn, *fn_args)
        while reads:
            ready, fetched = reads.popleft()
            fn, fn_args = _task(ready, shape, classes, fetched.result())
            yield ready, pool.submit(fn, *fn_args)

    pending: deque[tuple[list[FileEntry], Future]] = deque()
    in_flight = max(2, 2 * workers)
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        try:
            for ch, fut in submissions(pool):
                pending.append((ch, fut))
                if len(pending) >= in_flight:
                    done_ch, done = pending.popleft()
                    yield done_ch, done.result()
            while pending:
                done_ch, done = pending.popleft()
                yield done_ch, done.result()
        finally:
            for _, fut in [*pending, *reads]:
                fut.cancel()
            if io_pool is not None:
                io_pool.shutdown(wait=False, cancel_futures=True)


def _index(previous: Snapshot | None, staged: list[Any], packs: set[str]):
    """The images whose pixels we may reuse: rel path, file identity, shard digest and
    row, and their profile statistics (a DataFrame; journal rows win over the previous
    collection's)."""
    import pandas as pd

    frames = []
    if previous is not None:
        prof = previous.profile()
        if "file_size" in prof.columns:
            digests = np.asarray(previous.shard_digests, dtype=object)
            frames.append(prof.assign(shard_digest=digests[prof["shard"].to_numpy()]))
    # a killed try's journal may hold part of a pack's members (a pack can span shards): packs are
    # reused whole, from a finished collection only
    frames.extend(f[[pack_of(str(src), packs) is None for src in f["source"]]] if packs else f for f in staged)
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True).drop_duplicates(subset="source", keep="last")
    # the listing entry a row came from: the pack that holds it, else the file itself
    if not packs:
        return table.assign(origin=table["source"].astype(str))
    return table.assign(origin=[pack_of(str(src), packs) or str(src) for src in table["source"]])


#: Between a pack's path and its member's in a row's ``source``: ``shard-0001.tar::cat/001.jpg``.
PACK_MARK = "::"


def pack_of(source: str, packs: set[str]) -> str | None:
    """The pack (one of today's listed ``packs``) a row's ``source`` is a member of, or None. Decided
    against the listing, not by parsing: a file or member name may itself contain ``::``."""
    i = source.find(PACK_MARK)
    while i >= 0:
        if source[:i] in packs:
            return source[:i]
        i = source.find(PACK_MARK, i + 1)
    return None


def member_class(source: str, pack: str) -> str:
    """The class of the member ``source`` (``<pack>::<class>/<image>``) of ``pack``."""
    return source[len(pack) + len(PACK_MARK):].split("/", 1)[0]


def _whole_packs(m: Any, previous: Snapshot | None, label_of: dict[str, int]) -> Any:
    """``m`` (reusable rows) less every pack that cannot be reused whole: one of whose members the
    previous collection could not decode (its reason is today's to report again), or holding a
    class that is no longer configured (today's labels would be wrong)."""
    packed = m["pack"].to_numpy(bool)
    if not packed.any():
        return m
    rels = set(m.loc[packed, "rel"])
    paths = [str(b.get("path", "")) for b in (previous.manifest.get("undecodable") or [] if previous else [])]
    bad = {pack_of(path, rels) or path for path in paths} & rels  # a member's error, or the pack's own
    unknown = {r for r, src in zip(m.loc[packed, "rel"], m.loc[packed, "source"]) if member_class(src, r) not in label_of}
    return m[~m["rel"].isin(bad | unknown) | ~packed]


#: How long a collection waits for another collection of the same source (then it fails, retryable).
SOURCE_LOCK_TIMEOUT_S = 3600.0


@contextmanager
def source_lock(root_dir: Path, key: str, say: Callable[[str], None] | None = None, *,
                timeout_s: float = SOURCE_LOCK_TIMEOUT_S, store: Any = None) -> Iterator[None]:
    """One collection of a source at a time (:func:`nightshift.locks.file_lock` on
    ``<snapshots root>/locks/<key>.lock``; with an object-store ``store``, its lease lock on
    the same key, which holds across workers): overlapping runs would share and remove each
    other's staging journal; the second waits, then reuses what the first collected.

    :raises LockTimeout: the other collection held it for ``timeout_s``; names its holder."""
    from nightshift.locks import LockTimeout, file_lock

    path = Path(root_dir) / "locks" / f"{key}.lock"
    def on_wait() -> None:
        (say or log.info)(f"another collection of this source holds {path}: waiting for it")

    if store is not None and store.remote and store.rel(path):
        with store.lock(store.rel(path), timeout_s=timeout_s, purpose="collect_data",
                        what="another collection of this source", error=LockTimeout, on_wait=on_wait):
            yield
        return
    with file_lock(path, timeout_s=timeout_s, purpose="collect_data", what="another collection of this source",
                   on_wait=on_wait):
        yield


def fetch_journal(store: Any, root_dir: Path, staging: Path) -> int:
    """Bring a killed try's journal (``staging/<key>/*.parquet``) and the shards it names from
    the object store into this working copy; return how many entries arrived. What cannot be
    fetched only costs decoding those files again (logged, never an error: the journal is an
    optimisation, and every shard is verified against its digest when fetched)."""
    from nightshift.store import StoreError

    rel = store.rel(staging)
    if rel is None:
        return 0
    try:
        names = sorted(r for r in store.files(rel) if r.endswith(".parquet"))
    except StoreError as exc:
        log.warning("cannot list the collection journal at %s (%s): its files are decoded again",
                    store.to_uri(staging), exc)
        return 0
    got = 0
    for r in names:
        digest = Path(r).stem
        try:
            store.fetch(store.to_uri(root_dir / SHARDS_DIR / digest))  # the shard first: an entry names it
            store.fetch_file(r)
            got += 1
        except StoreError as exc:
            log.warning("cannot fetch journal entry %s (%s): its files are decoded again", r, exc)
    if got:
        log.info("fetched %d journal entr%s of an earlier try from %s", got, "y" if got == 1 else "ies",
                 store.to_uri(staging))
    return got


def publish_journal_entry(store: Any, root_dir: Path, staging: Path, digest: str) -> None:
    """Upload a finished shard, then its journal entry, so another worker's retry can reuse it.
    The shard is content-addressed, so the final publish finds it there and skips it. A failed
    upload is logged, not raised: it only means a retry elsewhere decodes those files again (the
    collection's own publish of the snapshot reports an unreachable store)."""
    from nightshift.store import StoreError

    try:
        store.publish(root_dir / SHARDS_DIR / digest)
        store.publish(staging / f"{digest}.parquet")
    except StoreError as exc:
        log.warning("journal entry for shard %s not uploaded (%s): a retry on another worker decodes its files "
                    "again", digest[:12], exc)


def drop_journal(store: Any, staging: Path) -> None:
    """Delete the journal's objects once the collection is published (leftovers cost nothing but
    space: the next try reuses their shards, which the record names anyway)."""
    from nightshift.store import StoreError

    rel = store.rel(staging)
    if rel is None:
        return
    try:
        for r in sorted(store.files(rel)):
            store.delete(r)
    except StoreError as exc:
        log.warning("collection journal %s not removed from the store (%s)", store.to_uri(staging), exc)


def collect_imagefolder(
    root: Any, shape: tuple[int, int, int], snapshots_root: str | Path, *,
    class_names: list[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
    workers: int | None = None, shard_mb: float = DEFAULT_SHARD_MB, partition_window: int | None = None,
    io_concurrency: int = 16, incremental: bool = True, context: dict[str, Any] | None = None,
    collected_at: datetime | None = None, progress: Callable[[str], None] | None = None, store: Any = None,
) -> tuple[Snapshot, CollectStats]:
    """Collect ``root/<class>/<image>`` into a sharded snapshot under ``snapshots_root``.

    :param workers: decode processes (default one per CPU; 1 decodes in this process).
    :param shard_mb: MiB of pixels per shard.
    :param partition_window: read ``root/<partition>/<class>/<image>``, only the
        last N partitions in name order (e.g. dates).
    :param io_concurrency: object-storage reads/stats in flight.
    :param incremental: reuse pixels of unchanged files (see the module docstring).
    :param store: the artifact store ``snapshots_root`` is the working copy of
        (:class:`nightshift.store.Store`). On an object store the previous collection of the
        source is fetched first, the lock holds across workers, and the new collection (shards,
        record, source pointer) is published before the lock is released.
    :returns: the snapshot and what was decoded, reused and written.
    """
    t0 = time.perf_counter()
    check_fractions(val_fraction, test_fraction)
    root_dir = Path(snapshots_root)
    workers = default_workers() if workers is None else max(1, int(workers))
    listing = list_imagefolder(root, class_names, partition_window=partition_window, io_concurrency=io_concurrency)
    classes = listing.class_names
    label_of = {name: i for i, name in enumerate(classes)}
    source = {"kind": "imagefolder", "root": str(root)}
    if listing.partitions:
        source["partitions"] = listing.partitions
    key = source_key(source, shape)
    stats = CollectStats(listed=len(listing.entries))
    say = progress or (lambda msg: log.info("%s", msg))

    # ---- one collection of a source at a time (overlapping runs share its staging journal);
    # the kernel releases the lock when a killed collector dies
    with source_lock(root_dir, key, say, store=store), ExitStack() as cleanup:
        # ---- what can be reused: the previous collection of this source + a killed try's journal
        import pandas as pd

        staging = root_dir / STAGING_DIR / key
        remote = store is not None and store.remote
        # object store: each finished shard and its journal entry are uploaded by one thread of their
        # own, in order, while decoding goes on; the snapshot's publish waits for them
        upload_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect-upload") if remote else None
        uploads: list[Future] | None = [] if remote else None
        if upload_pool is not None:  # a failed collection still finishes the uploads of its finished shards
            cleanup.callback(upload_pool.shutdown)
        if incremental and remote:
            fetch_latest(store, root_dir, key)  # another worker's collection (object store)
            fetch_journal(store, root_dir, staging)  # a killed try's finished shards, from any worker
        previous = latest(root_dir, key) if incremental else None
        staged = []
        if incremental and staging.is_dir():
            for f in sorted(staging.glob("*.parquet")):
                try:
                    staged.append(pd.read_parquet(f).assign(shard_digest=f.stem))
                except Exception as exc:  # noqa: BLE001 - a journal we cannot read only costs decoding
                    log.warning("ignoring unreadable collection journal %s: %s", f, exc)
        pack_rels = {e.rel for e in listing.entries if e.pack}
        table = _index(previous, staged, pack_rels) if incremental else None

        entries = listing.entries
        files = pd.DataFrame({"rel": [e.rel for e in entries], "size": [str(e.size) for e in entries],
                              "mtime": [e.mtime for e in entries], "pos": np.arange(len(entries)),
                              "pack": [e.pack for e in entries]})
        if table is not None:
            m = files.merge(table, left_on="rel", right_on="origin", how="inner")
            m = m[(m["file_size"].astype(str) == m["size"]) & (m["file_mtime"].astype(str) == m["mtime"])
                  & (m["mtime"] != "")]  # no stamp: cannot tell whether it changed, so decode it
            m = _whole_packs(m, previous, label_of)
        else:
            m = files.iloc[:0].assign(shard_digest=[], row=[], source=[])
        # every shard to reuse pixels from, opened (and verified) now: when one cannot be, the files
        # and packs with rows in it are decoded again, each once and whole
        opened: dict[str, Any] = {}
        lost: set[int] = set()
        for digest in m["shard_digest"].unique().tolist():
            try:
                opened[digest] = open_shard(root_dir, digest)
            except DataError as exc:
                grp = m[m["shard_digest"] == digest]
                log.warning("cannot reuse shard %s (%s); decoding its %d image(s) again", digest[:12], exc, len(grp))
                lost.update(grp["pos"].tolist())
        if lost:
            m = m[~m["pos"].isin(lost)]
        reused_pos = set(m["pos"].tolist())
        todo = [e for i, e in enumerate(entries) if i not in reused_pos]
        n_packs = sum(e.pack for e in entries)
        stats.packs = n_packs
        listed = f"{len(entries) - n_packs} image files" + (f" and {n_packs} pack(s)" if n_packs else "")
        say(f"collect {root}: {listed}; {len(m)} images unchanged (reused), {len(todo)} "
            f"{'files/packs' if n_packs else 'files'} to decode with {workers} worker(s)")

        h, w, c = shape
        cap = capacity(shape, shard_mb)
        stat_cols = ["sha256", "brightness", "contrast", *[f"mean_ch{k}" for k in range(c)]]
        kept = _Columns()      # rows of shards kept whole, in final order
        pending = _Columns()   # rows pushed to the writer, not yet in a written shard
        written = _Columns()   # rows of the shards written now, in order
        undecodable = list(listing.skipped)
        final_shards: list[tuple[str, int]] = []  # kept whole, in order

        def journal(digest: str, count: int) -> None:
            import io

            from nightshift.artifacts import atomic_write_bytes

            rows = pending.take(count)
            written.append(rows)
            buf = io.BytesIO()
            pd.DataFrame({k: v for k, v in rows.items() if k not in ("label", "split")}).assign(
                row=np.arange(count)).to_parquet(buf, index=False)
            atomic_write_bytes(staging / f"{digest}.parquet", buf.getvalue())
            if uploads is not None:  # off the decode loop: the upload overlaps the next shard's decoding
                uploads.append(upload_pool.submit(publish_journal_entry, store, root_dir, staging, digest))

        writer = ShardWriter(root_dir, shape, cap, on_shard=journal)

        def push(images: np.ndarray, cols: dict[str, Any]) -> None:
            pending.append(cols)
            writer.add(images, np.asarray(cols["label"], np.int64), np.asarray(cols["split"]))

        # ---- 1. pixels we already have, shard by shard (each opened once, memory-mapped)
        label_arr = np.asarray([label_of.get(e.class_name, -1) for e in entries], np.int64)  # packs: per member
        for digest, grp in m.groupby("shard_digest", sort=False):
            shard = opened[digest]
            grp = grp.sort_values("row")
            idx = grp["row"].to_numpy(np.int64)
            labels = label_arr[grp["pos"].to_numpy(np.int64)]
            packed = grp["pack"].to_numpy(bool)
            if packed.any():
                labels[packed] = [label_of[member_class(src, rel)]
                                  for src, rel in zip(grp["source"][packed], grp["rel"][packed])]
            splits = assign_splits(grp["sha256"].tolist(), val_fraction=val_fraction, test_fraction=test_fraction)
            cols = {**{k: grp[k].to_numpy() for k in stat_cols}, "label": labels, "split": splits,
                    "orig_height": grp["orig_height"].to_numpy(np.int64), "orig_width": grp["orig_width"].to_numpy(np.int64),
                    "orig_channels": grp["orig_channels"].to_numpy(np.int64), "source": grp["source"].to_numpy(),
                    "file_size": grp["size"].to_numpy(), "file_mtime": grp["mtime"].to_numpy()}
            whole = (len(idx) == len(shard.labels) == cap and np.array_equal(idx, np.arange(cap))
                     and np.array_equal(labels, shard.labels) and np.array_equal(splits, shard.splits))
            stats.reused += len(idx)
            if whole:  # the whole shard, unchanged: share it as it is
                final_shards.append((digest, cap))
                kept.append({**cols, "shard": np.full(cap, len(final_shards) - 1), "row": np.arange(cap)})
                stats.shards_reused += 1
            else:  # part of it: copy those rows into new shards
                for i in range(0, len(idx), cap):
                    sel = slice(i, i + cap)
                    push(np.asarray(shard.images[idx[sel]]), {k: v[sel] for k, v in cols.items()})

        # ---- 2. new and changed files, decoded in parallel, in listing order
        todo.sort(key=lambda e: e.rel)
        done = 0
        last_report = time.monotonic()
        for chunk_entries, chunk in _iter_chunks(todo, shape, workers, io_concurrency, classes):
            if chunk_entries[0].pack:  # one pack: its members, each with the pack's size and stamp
                pack = chunk_entries[0]
                rels = [f"{pack.rel}{PACK_MARK}{n}" for n in chunk.names]
                owners = [pack] * len(rels)
                class_names_of = [n.split("/", 1)[0] for n in chunk.names]
            else:
                rels = [e.rel for e in chunk_entries]
                owners = chunk_entries
                class_names_of = [e.class_name for e in chunk_entries]
            for i, msg in chunk.errors:
                undecodable.append({"path": chunk_entries[0].rel if i < 0 else rels[i], "error": msg})
            ok = chunk.ok
            if ok:
                splits = assign_splits(chunk.stats["sha256"], val_fraction=val_fraction, test_fraction=test_fraction)
                push(chunk.images, {
                    **{k: np.asarray(chunk.stats[k]) for k in stat_cols},
                    "label": np.asarray([label_of[class_names_of[i]] for i in ok], np.int64), "split": splits,
                    "orig_height": chunk.orig_sizes[:, 0], "orig_width": chunk.orig_sizes[:, 1],
                    "orig_channels": chunk.orig_sizes[:, 2], "source": np.asarray([rels[i] for i in ok]),
                    "file_size": np.asarray([str(owners[i].size) for i in ok]),
                    "file_mtime": np.asarray([owners[i].mtime for i in ok])})
            stats.decoded += len(ok)
            done += len(chunk_entries)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                rate = stats.decoded / max(time.perf_counter() - t0, 1e-9)
                say(f"decoded {done}/{len(todo)} {'files/packs' if n_packs else 'files'} ({rate:.0f} images/s), "
                    f"{len(writer.written)} shard(s) written")
        writer.flush()
        for fut in uploads or []:  # before the record: publish_journal_entry logs a store's failures itself
            fut.result()

        # ---- 3. the record: whole reused shards first, then the shards written now
        del entries, files, m, todo, table, listing, opened, label_arr  # O(images) objects not needed any more
        offset = len(final_shards)
        for i, (part, (_digest, n)) in enumerate(zip(written.parts, writer.written)):
            part["shard"] = np.full(n, offset + i)
            part["row"] = np.arange(n)
        final_shards.extend(writer.written)
        cols = _concat(kept.parts + written.parts)  # one copy of the per-image columns
        kept.parts.clear()
        written.parts.clear()
        stats.shards_written = len(writer.written)
        stats.undecodable = len(undecodable)
        if not cols:
            raise DataError(f"imagefolder source {root} yielded no decodable image: {len(undecodable)} file(s) failed "
                            f"(first: {undecodable[:3]})")
        meta = {**{k: cols[k] for k in stat_cols}, "label": cols["label"], "split": cols["split"],
                "orig_size": np.stack([cols["orig_height"], cols["orig_width"], cols["orig_channels"]], axis=1),
                "source": cols["source"].tolist(), "shard": cols["shard"], "row": cols["row"],
                "file_size": cols["file_size"].astype(str).astype(object), "file_mtime": cols["file_mtime"].astype(object)}
        del cols
        split_cfg = {"method": "sha256-of-pixels", "val_fraction": val_fraction, "test_fraction": test_fraction,
                     "predefined_test": False}
        stats.seconds = round(time.perf_counter() - t0, 3)
        snap = write_record(root_dir, shards=final_shards, meta=meta, class_names=classes, shape=shape,
                            source=source, undecodable=sorted(undecodable, key=lambda b: b["path"]),
                            split_cfg=split_cfg, collected_at=collected_at, context=context,
                            extra={"shard_mb": shard_mb, "incremental": {
                                "previous_collection": previous.collection_id if previous else None,
                                "journal_rows": int(sum(len(f) for f in staged)), **stats.to_dict()}})
        set_latest(root_dir, key, snap)
        if store is not None:
            publish_snapshot(store, snap)  # shards, record, then the pointer: under the lock
        shutil.rmtree(staging, ignore_errors=True)
        if remote:
            drop_journal(store, staging)
        say(f"collected {stats.listed} {'files/packs' if stats.packs else 'files'}: {stats.decoded} decoded, {stats.reused} reused, "
            f"{stats.undecodable} undecodable; {stats.shards_written} shard(s) written, {stats.shards_reused} shared; "
            f"{stats.seconds:.1f}s")
        return snap, stats
