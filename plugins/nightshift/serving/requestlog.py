"""The request log for drift monitoring: sampled per-image records in rotating binary files.

Standard library + numpy only (copied into the inference image). The
contract is documented in ``docs/serving.md`` ("Request log"); the
drift-monitoring DAG reads it (:func:`read_file` here, through
``nightshift.monitoring.read_request_log``).

Cost on the request path: :meth:`RequestLog.submit` appends a reference to the
request's pixels and outputs to a list under an uncontended lock (no copy, no
thread wake-up; when the pending budget is full the sample is dropped and
counted). A writer thread wakes every ``flush_s`` (or when enough is pending),
takes everything pending at once and turns it into one *frame* per model and
endpoint with a handful of numpy operations over the whole batch: the profile
features with the *same* functions the training profile table uses
(``nightshift.data.decode.image_digests`` / ``image_moments``, copied into the
image as ``serving/decode.py``), the predicted class and confidence, and the
embedding as float16. Per image there is only the SHA-256 call; there is no
per-record Python object and no JSON. So the writer holds the GIL for a few
milliseconds per flush, not per request, and never wakes per request.

Files: ``<dir>/requests-<start>-<writer>-<seq>.nsrl.part`` while written
(``<writer>``: host name, pid and a random token, unique across the containers
of a blue/green switch that share the directory), renamed to ``.nsrl`` when
rotated (by size or age) or when the server stops, so a reader only ever sees
complete files. The writer holds an exclusive ``flock`` on its open file: a
server that starts publishes the ``.part`` files nobody holds any more (left by
a killed server), cut after their last complete frame. Older servers wrote JSON
Lines (``requests-*.jsonl``, schema ``nightshift.request_log/1``); their orphans
are recovered the same way (cut after the last complete line) and
``monitoring.read_request_log`` still reads them, so a deploy across versions
keeps its history.

File format (``.nsrl``), a sequence of frames, each::

    magic  8 bytes   b"NSRL\\x01\\r\\n\\x00"
    u32    header length (little endian)
    u64    body length
    u32    CRC-32 of header + body
    header UTF-8 JSON: schema, model_name, model_version, endpoint, class_names,
           shape [H, W, C], n (records), dtype (numpy ``descr`` of the body)
    body   n records of that numpy structured dtype: time_us (int64, Unix
           microseconds the request was answered), sha256 (32 bytes), brightness,
           contrast (float64), mean_ch (float64 x C), predicted_index (int32),
           confidence (float64), embedding (float16 x D; float32 for a frame whose
           embeddings float16 cannot hold; absent for a model without one)

A frame that is cut short or fails its CRC ends the readable part of a file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import secrets
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

try:  # in the image: copied from nightshift/data/decode.py at build time
    from . import decode as _decode  # type: ignore[attr-defined]
except ImportError:  # in the repository
    from nightshift.data import decode as _decode

from .model import probabilities

log = logging.getLogger("nightshift.serving")

#: ``schema`` of every record (the fields and their meaning, in either file format); bump when
#: a field changes meaning.
SCHEMA = "nightshift.request_log/1"
#: Files a reader should read (complete): the binary frames, and JSON Lines written by servers
#: before the binary format; ``.part`` files are being written.
FILE_SUFFIX = ".nsrl"
FILE_GLOB = "requests-*" + FILE_SUFFIX
LEGACY_GLOB = "requests-*.jsonl"
READ_GLOBS = (FILE_GLOB, LEGACY_GLOB)

MAGIC = b"NSRL\x01\r\n\x00"  # \r\n and \0 catch text-mode and truncating transfers
_PREFIX = struct.Struct("<8sIQI")  # magic, header length, body length, crc32
#: Largest header or body a reader accepts (a corrupt length must not allocate gigabytes).
_MAX_FRAME = 1 << 30
#: float16's largest finite value: embeddings beyond it are stored as float32.
_F16_MAX = float(np.finfo(np.float16).max)
#: The model outputs a record is made of (others are not kept for the writer).
_LOGGED_OUTPUTS = ("logits", "probabilities", "embedding")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RequestLogConfig:
    """Every knob of the request log, in one place (the server reads them with :meth:`from_env`).

    :param directory: where the files go (a mounted volume in the container); ``None``: no log.
    :param sample_rate: fraction of requests logged, 0..1 (``deploy`` sets 1.0).
    :param rotate_bytes: publish the open file when it reaches this size.
    :param rotate_s: publish the open file when it is this old (so readers see recent data).
    :param max_bytes: the disk budget: complete files beyond it are deleted, oldest first.
    :param max_files: at most this many complete files are kept (oldest deleted).
    :param queue_size: pending requests beyond which samples are dropped (counted in ``dropped``).
    :param queue_bytes: pending pixel bytes beyond which samples are dropped (the memory budget).
    :param flush_s: how often the writer takes what is pending (the records' delay to disk).
    """

    directory: str | None = None
    sample_rate: float = 0.1
    rotate_bytes: int = 64 << 20
    rotate_s: float = 60.0
    max_bytes: int = 2 << 30
    max_files: int = 1000
    queue_size: int = 65536
    queue_bytes: int = 64 << 20
    flush_s: float = 0.25

    #: field -> environment variable of the serving container
    ENV = {"directory": "NIGHTSHIFT_REQUEST_LOG_DIR", "sample_rate": "NIGHTSHIFT_REQUEST_LOG_SAMPLE",
           "rotate_bytes": "NIGHTSHIFT_REQUEST_LOG_ROTATE_BYTES", "rotate_s": "NIGHTSHIFT_REQUEST_LOG_ROTATE_S",
           "max_bytes": "NIGHTSHIFT_REQUEST_LOG_MAX_BYTES", "max_files": "NIGHTSHIFT_REQUEST_LOG_MAX_FILES",
           "queue_size": "NIGHTSHIFT_REQUEST_LOG_QUEUE_SIZE", "queue_bytes": "NIGHTSHIFT_REQUEST_LOG_QUEUE_BYTES",
           "flush_s": "NIGHTSHIFT_REQUEST_LOG_FLUSH_S"}

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within 0..1, got {self.sample_rate}")
        for name in ("rotate_bytes", "max_bytes", "max_files", "queue_size", "queue_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rotate_s", "flush_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RequestLogConfig":
        """The configuration from ``NIGHTSHIFT_REQUEST_LOG_*`` (unset or empty: the default).

        :raises ValueError: naming the variable, when one does not parse or is out of range.
        """
        env = os.environ if environ is None else environ
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            if not raw:
                continue
            kind = str if name == "directory" else (float if "float" in str(kinds[name]) else int)
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        try:
            return cls(**values)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            raise ValueError(f"{cls.ENV.get(name, name)}: {exc}") from None


# --------------------------------------------------------------------------- frames


def _record_dtype(channels: int, emb_dim: int | None, emb_dtype: str = "<f2") -> np.dtype:
    spec: list[tuple[Any, ...]] = [("time_us", "<i8"), ("sha256", "u1", (32,)), ("brightness", "<f8"),
                                   ("contrast", "<f8"), ("mean_ch", "<f8", (channels,)),
                                   ("predicted_index", "<i4"), ("confidence", "<f8")]
    if emb_dim is not None:
        spec.append(("embedding", emb_dtype, (emb_dim,)))
    return np.dtype(spec)


def build_frame(pixels: np.ndarray, outputs: dict[str, np.ndarray], time_us: np.ndarray) -> np.ndarray:
    """The records of a batch of images (one model, one endpoint) as a structured array.

    :param time_us: per image, when its request was answered (Unix microseconds).
    """
    n, _, _, c = pixels.shape
    emb = outputs.get("embedding")
    emb_dtype = "<f2"
    if emb is not None:
        emb = np.asarray(emb).reshape(n, -1)
        if emb.size and not float(np.abs(emb).max()) <= _F16_MAX:  # also NaN: keep it exactly
            emb_dtype = "<f4"
    rec = np.empty(n, _record_dtype(c, None if emb is None else emb.shape[1], emb_dtype))
    rec["time_us"] = time_us
    rec["sha256"] = np.frombuffer(b"".join(_decode.image_digests(pixels)), np.uint8).reshape(n, 32)
    moments = _decode.image_moments(pixels)
    rec["brightness"], rec["contrast"] = moments["brightness"], moments["contrast"]
    rec["mean_ch"] = np.stack([moments[f"mean_ch{k}"] for k in range(c)], axis=1)
    p = probabilities(outputs)
    idx = outputs["logits"].argmax(axis=1)  # the same class the `label` output names
    rec["predicted_index"] = idx
    rec["confidence"] = p[np.arange(n), idx]
    if emb is not None:
        rec["embedding"] = emb
    return rec


def encode_frame(rec: np.ndarray, *, model_name: str, model_version: str, endpoint: str,
                 class_names: list[str], shape: tuple[int, int, int]) -> list[bytes | memoryview]:
    """A frame's parts (prefix, header, body) ready for one ``writev``."""
    header = json.dumps({"schema": SCHEMA, "model_name": model_name, "model_version": model_version,
                         "endpoint": endpoint, "class_names": list(class_names), "shape": [int(v) for v in shape],
                         "n": int(len(rec)), "dtype": np.lib.format.dtype_to_descr(rec.dtype)},
                        separators=(",", ":")).encode("utf-8")
    body = memoryview(np.ascontiguousarray(rec)).cast("B")
    crc = zlib.crc32(body, zlib.crc32(header))
    return [_PREFIX.pack(MAGIC, len(header), len(body), crc), header, body]


def iter_frames(data: bytes | memoryview) -> Iterator[tuple[int, dict[str, Any], np.ndarray]]:
    """``(end offset, header, records)`` of each complete, intact frame of a file's bytes, in order;
    stops at the first frame that is cut short or corrupt (check the last end offset against
    ``len(data)`` to know whether the whole file was read)."""
    view = memoryview(data)
    pos = 0
    while pos + _PREFIX.size <= len(view):
        magic, hlen, blen, crc = _PREFIX.unpack_from(view, pos)
        start = pos + _PREFIX.size
        end = start + hlen + blen
        if magic != MAGIC or hlen > _MAX_FRAME or blen > _MAX_FRAME or end > len(view):
            return
        header_b, body = view[start:start + hlen], view[start + hlen:end]
        if zlib.crc32(body, zlib.crc32(header_b)) != crc:
            return
        try:
            header = json.loads(bytes(header_b))
            dtype = np.lib.format.descr_to_dtype(_descr(header["dtype"]))
            rec = np.frombuffer(body, dtype=dtype, count=int(header["n"]))
        except (ValueError, KeyError, TypeError):
            return
        pos = end
        yield pos, header, rec


def _descr(value: Any) -> Any:
    """JSON turned the dtype descr's tuples (``(name, format[, shape])``) into lists; numpy
    wants them back."""
    if not isinstance(value, list):
        return value
    return [(f[0], f[1]) if len(f) == 2 else (f[0], f[1], tuple(f[2])) for f in value]


def frame_columns(header: dict[str, Any], rec: np.ndarray) -> dict[str, Any]:
    """A frame's records as columns with the record fields of ``docs/serving.md`` (the names,
    values and Python types a JSON Lines record had: ``timestamp`` an ISO 8601 string with
    milliseconds and ``Z``, ``sha256`` hex, ``embedding`` a list of floats or ``None``)."""
    n = len(rec)
    h, w, c = (int(v) for v in header["shape"])
    classes = list(header["class_names"])
    ms = (rec["time_us"] // 1000).astype("datetime64[ms]")
    idx = rec["predicted_index"].astype(np.int64)
    cols: dict[str, Any] = {
        "schema": [header.get("schema", SCHEMA)] * n,
        "timestamp": [t + "Z" for t in np.datetime_as_string(ms, unit="ms").tolist()],
        "model_name": [header["model_name"]] * n, "model_version": [header["model_version"]] * n,
        "endpoint": [header["endpoint"]] * n,
        "height": np.full(n, h, np.int64), "width": np.full(n, w, np.int64), "channels": np.full(n, c, np.int64),
        "sha256": [bytes(d).hex() for d in rec["sha256"]],
        "brightness": rec["brightness"].astype(np.float64), "contrast": rec["contrast"].astype(np.float64),
    }
    mean_ch = rec["mean_ch"].reshape(n, -1)
    for k in range(mean_ch.shape[1]):
        cols[f"mean_ch{k}"] = mean_ch[:, k].astype(np.float64)
    cols["predicted_index"] = idx
    cols["predicted_class"] = [classes[i] for i in idx.tolist()]
    cols["confidence"] = rec["confidence"].astype(np.float64)
    names = rec.dtype.names or ()
    cols["embedding"] = (rec["embedding"].reshape(n, -1).astype(np.float64).tolist() if "embedding" in names
                         else [None] * n)
    return cols


def read_file(path: str | os.PathLike[str]) -> tuple[list[tuple[dict[str, Any], np.ndarray]], bool]:
    """The frames of one ``.nsrl`` file (or ``.part``) as ``(header, records)``, and whether
    the whole file was intact (``False``: a cut or corrupt tail was left unread)."""
    data = Path(path).read_bytes()
    frames, end = [], 0
    for end, header, rec in iter_frames(data):
        frames.append((header, rec))
    return frames, end == len(data)


def read_records(paths: list[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of request-log files (either format, complete or ``.part``) as dicts, in
    file order: what tests and people read; the drift monitor reads columns instead."""
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        paths = sorted(q for g in READ_GLOBS for q in list(p.glob(g)) + list(p.glob(g + ".part"))) \
            if p.is_dir() else [p]
    out: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if ".jsonl" in path.name:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill, in a .part file
            continue
        for header, rec in read_file(path)[0]:
            cols = frame_columns(header, rec)
            out.extend({k: _py(v[i]) for k, v in cols.items()} for i in range(len(rec)))
    return out


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def count_records(directory: str | os.PathLike[str]) -> int:
    """Records in the request-log files of ``directory``, published or still ``.part``, either format."""
    n = 0
    directory = Path(directory)
    for g in READ_GLOBS:
        for f in list(directory.glob(g)) + list(directory.glob(g + ".part")):
            try:
                if g == LEGACY_GLOB:
                    with open(f, "rb") as fh:
                        n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
                else:
                    n += sum(len(rec) for _, rec in read_file(f)[0])
            except OSError as exc:
                log.warning("could not read request-log file %s: %s", f, exc)
    return n


def build_records(pixels: np.ndarray, outputs: dict[str, np.ndarray], *, model_name: str, model_version: str,
                  class_names: list[str], endpoint: str, timestamp: float,
                  extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per image as a dict (see ``docs/serving.md``): the frame the writer would
    write for this batch, read back (the embedding at float16 precision)."""
    n = len(pixels)
    rec = build_frame(pixels, outputs, np.full(n, _time_us(timestamp), np.int64))
    header = {"schema": SCHEMA, "model_name": model_name, "model_version": model_version, "endpoint": endpoint,
              "class_names": list(class_names), "shape": list(pixels.shape[1:])}
    cols = frame_columns(header, rec)
    return [{**{k: _py(v[i]) for k, v in cols.items()}, **(extra or {})} for i in range(n)]


def _time_us(ts: float) -> int:
    return int(round(ts * 1e6))


# --------------------------------------------------------------------------- files


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:32] or "host"


def _complete_length(part: Path, data: bytes) -> int:
    """How many leading bytes of an orphaned ``.part`` file hold complete records."""
    if part.name.endswith(".jsonl.part"):
        return data.rfind(b"\n") + 1  # a line cut by the kill is dropped
    end = 0
    for end, _, _ in iter_frames(data):
        pass
    return end


def recover_orphans(directory: Path) -> list[Path]:
    """Publish the ``.part`` files no live writer holds (a killed server's, of either format),
    cut after their last complete record; empty ones are removed. Never blocks.

    :returns: the files published.
    """
    published = []
    for part in sorted(p for g in READ_GLOBS for p in directory.glob(g + ".part")):
        try:
            with open(part, "r+b") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running server is writing it
                data = fh.read()
                end = _complete_length(part, data)
                if end == 0:
                    part.unlink()
                    continue
                if end < len(data):
                    fh.truncate(end)
                final = part.with_suffix("")
                os.replace(part, final)
                published.append(final)
        except FileNotFoundError:
            continue  # published or removed by another server meanwhile
        except OSError as exc:
            log.warning("request log: could not recover %s: %s", part, exc)
    if published:
        log.warning("request log: published %d file(s) left by a server that stopped without closing them",
                    len(published))
    return published


def enforce_budget(directory: Path, max_bytes: int, max_files: int) -> list[Path]:
    """Delete the oldest complete files (by name: they start with their UTC start time) until
    at most ``max_files`` remain and they take at most ``max_bytes``. :returns: the files deleted."""
    files = []
    for g in READ_GLOBS:
        for f in directory.glob(g):
            try:
                files.append((f.name, f, f.stat().st_size))
            except OSError:
                continue  # deleted by another writer meanwhile
    files.sort()
    total = sum(size for _, _, size in files)
    deleted = []
    for _, f, size in files:
        if total <= max_bytes and len(files) - len(deleted) <= max_files:
            break
        try:
            f.unlink()
        except OSError:
            pass
        total -= size
        deleted.append(f)
    return deleted


# --------------------------------------------------------------------------- the log


class RequestLog:
    """Sampled, rotating, non-blocking request log.

    :param directory: where the files go; defaults to ``config.directory``.
    :param config: the settings (:class:`RequestLogConfig`); keyword arguments override its
        fields (``sample_rate=1.0, rotate_s=5`` ...).
    :param seed: of the sampling decisions (tests).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, config: RequestLogConfig | None = None, *,
                 seed: int | None = None, **overrides: Any):
        config = replace(config or RequestLogConfig(), **overrides)
        directory = directory if directory is not None else config.directory
        if directory is None:
            raise ValueError("RequestLog needs a directory (NIGHTSHIFT_REQUEST_LOG_DIR)")
        self.config = replace(config, directory=str(directory))
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")  # fail at start, not on the first sample, when it is not writable
        probe.unlink()
        self.sample_rate = self.config.sample_rate
        self._rng = random.Random(seed)
        self.written = 0  # records
        self.bytes_written = 0
        self.dropped = 0  # requests
        self.failed = 0
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._pending_bytes = 0
        self._wake = threading.Event()
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0
        self._seq = 0
        self._writer = f"{_safe(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(3)}"
        self.recovered = recover_orphans(self.directory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Decide whether to log this request (cheap)."""
        return self.sample_rate >= 1.0 or (self.sample_rate > 0.0 and self._rng.random() < self.sample_rate)

    def submit(self, pixels: np.ndarray, outputs: dict[str, np.ndarray], **meta: Any) -> bool:
        """Hand one request's images and outputs to the writer; never blocks, never copies.

        ``meta``: ``model_name``, ``model_version``, ``class_names``, ``endpoint``.

        :returns: ``False`` if the sample was dropped (pending budget full, or log closed).
        """
        if self._stop.is_set():
            return False
        nbytes = pixels.nbytes
        cfg = self.config
        with self._lock:
            if len(self._pending) >= cfg.queue_size or self._pending_bytes + nbytes > cfg.queue_bytes:
                self.dropped += 1
                return False
            self._pending.append((pixels, outputs, meta, time.time()))
            self._pending_bytes += nbytes
            full = len(self._pending) * 2 == cfg.queue_size or self._pending_bytes * 2 > cfg.queue_bytes
        if full:  # half the budget waits: write now instead of at the next tick (once per crossing)
            self._wake.set()
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending, close and publish the open file."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    # -- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if not stopping:
                self._wake.wait(self.config.flush_s)
                self._wake.clear()
            with self._lock:
                items, self._pending, self._pending_bytes = self._pending, [], 0
            if items:
                self._write_items(items)
            if self._fd is not None and time.monotonic() - self._opened >= self.config.rotate_s:
                self._publish()
            if stopping:  # one more pass after the stop was seen: nothing submitted before it is lost
                break
        self._publish()

    def _write_items(self, items: list[tuple[Any, ...]]) -> None:
        """One frame per (model, version, endpoint, classes, image shape, output names)."""
        by_id: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for it in items:  # per item only a cheap key (the server passes one class-name list)
            pixels, outputs, meta, _ = it
            key = (meta["model_name"], meta["model_version"], meta["endpoint"], id(meta["class_names"]),
                   pixels.shape[1:], tuple(outputs))
            by_id.setdefault(key, []).append(it)
        groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for key, its in by_id.items():  # then equal class names by value, once per group
            groups.setdefault(key[:3] + (tuple(its[0][2]["class_names"]),) + key[4:], []).extend(its)
        for group in groups.values():
            try:
                self._write_group(group)
            except Exception as exc:  # noqa: BLE001 - logging must never take the server down
                self.failed += 1
                log.warning("request log: could not write %d sample(s): %s: %s", len(group),
                            type(exc).__name__, exc)

    def _write_group(self, group: list[tuple[Any, ...]]) -> None:
        meta = group[0][2]
        if len(group) == 1:
            pixels, outputs = group[0][0], group[0][1]
        else:
            pixels = np.concatenate([it[0] for it in group])
            outputs = {k: np.concatenate([it[1][k] for it in group]) for k in _LOGGED_OUTPUTS if k in group[0][1]}
        counts = [len(it[0]) for it in group]
        times = np.repeat(np.round(np.array([it[3] for it in group]) * 1e6).astype(np.int64), counts)
        rec = build_frame(pixels, outputs, times)
        parts = encode_frame(rec, model_name=meta["model_name"], model_version=meta["model_version"],
                             endpoint=meta["endpoint"], class_names=meta["class_names"], shape=pixels.shape[1:])
        self._write_frame(parts)
        self.written += len(rec)

    def _write_frame(self, parts: list[bytes | memoryview]) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None and self._path is not None
        total = sum(len(p) for p in parts)
        start = self._size
        try:
            done = os.writev(self._fd, parts)
            if done != total:
                raise OSError(f"short write: {done} of {total} bytes (disk full?)")
        except OSError:
            try:  # never leave half a frame: the frames after it would be unreadable
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self._size += total
        self.bytes_written += total
        if self._size >= self.config.rotate_bytes:
            self._publish()

    def _open(self) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self._seq += 1
        path = self.directory / f"requests-{stamp}-{self._writer}-{self._seq:05d}{FILE_SUFFIX}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while we write it
        except OSError:
            os.close(fd)
            raise
        self._fd, self._path, self._size, self._opened = fd, path, 0, time.monotonic()

    def _publish(self) -> None:
        if self._fd is None or self._path is None:
            return
        final = self._path.with_suffix("")  # drop .part
        try:
            # renamed while still locked: a starting server's recover_orphans never takes it over
            os.replace(self._path, final)
        except OSError as exc:  # the log must never stop the writer thread
            self.failed += 1
            log.warning("request log: could not publish %s: %s", self._path, exc)
        finally:
            os.close(self._fd)
            self._fd, self._path = None, None
        enforce_budget(self.directory, self.config.max_bytes, self.config.max_files)


__all__ = ["FILE_GLOB", "LEGACY_GLOB", "READ_GLOBS", "RequestLog", "RequestLogConfig", "SCHEMA", "build_frame",
           "build_records", "count_records", "encode_frame", "enforce_budget", "frame_columns", "iter_frames",
           "read_file", "read_records", "recover_orphans"]
