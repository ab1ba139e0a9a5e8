"""The request log for drift monitoring: sampled per-image records in rotating JSONL files.

Standard library + numpy only (copied into the inference image). The
contract is documented in ``docs/serving.md`` ("Request log"); the
drift-monitoring DAG reads it.

The request path only appends a reference to the batch to a bounded in-memory
queue (``O(1)``, never blocks; when the queue is full the sample is dropped and
counted). A writer thread computes the profile features -- with the *same*
function the training profile table uses (``nightshift.data.decode.image_stats``,
copied into the image as ``serving/decode.py``) -- and appends JSON lines to
``<dir>/requests-<start>-<writer>-<seq>.jsonl.part`` (``<writer>``: host name,
pid and a random token, unique across the containers of a blue/green switch
that share the directory); the file is renamed to ``.jsonl`` when it is rotated
(by size or age) or the server stops, so a reader only ever sees complete
files. The writer holds an exclusive ``flock`` on its open file: a server that
starts publishes the ``.part`` files nobody holds any more (left by a killed
server), cut after their last complete line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

try:  # in the image: copied from nightshift/data/decode.py at build time
    from . import decode as _decode  # type: ignore[attr-defined]
except ImportError:  # in the repository
    from nightshift.data import decode as _decode

from .model import probabilities

log = logging.getLogger("nightshift.serving")

#: ``schema`` field of every record; bump when a field changes meaning.
SCHEMA = "nightshift.request_log/1"
#: Files a reader should read (complete); ``.part`` files are being written.
FILE_GLOB = "requests-*.jsonl"


def _softmax_max(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    p = probabilities(outputs)
    idx = outputs["logits"].argmax(axis=1)  # the same class the `label` output names
    return idx, p[np.arange(len(p)), idx]


def build_records(pixels: np.ndarray, outputs: dict[str, np.ndarray], *, model_name: str, model_version: str,
                  class_names: list[str], endpoint: str, timestamp: float,
                  extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per image (see ``docs/serving.md``)."""
    stats = _decode.image_stats(pixels)
    n, h, w, c = pixels.shape
    idx, conf = _softmax_max(outputs)
    emb = outputs.get("embedding")
    ts = datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out = []
    for i in range(n):
        rec: dict[str, Any] = {
            "schema": SCHEMA, "timestamp": ts, "model_name": model_name, "model_version": model_version,
            "endpoint": endpoint, "height": int(h), "width": int(w), "channels": int(c),
            "sha256": stats["sha256"][i],
            "brightness": float(stats["brightness"][i]), "contrast": float(stats["contrast"][i]),
        }
        for k in range(c):
            rec[f"mean_ch{k}"] = float(stats[f"mean_ch{k}"][i])
        rec["predicted_index"] = int(idx[i])
        rec["predicted_class"] = class_names[int(idx[i])]
        rec["confidence"] = float(conf[i])
        rec["embedding"] = [float(x) for x in emb[i]] if emb is not None else None
        if extra:
            rec.update(extra)
        out.append(rec)
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:32] or "host"


def recover_orphans(directory: Path) -> list[Path]:
    """Publish the ``.part`` files no live writer holds (a killed server's), cut after
    their last complete line; empty ones are removed. Never blocks.

    :returns: the files published.
    """
    published = []
    for part in sorted(directory.glob(FILE_GLOB + ".part")):
        try:
            with open(part, "r+b") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running server is writing it
                data = fh.read()
                end = data.rfind(b"\n") + 1  # a line cut by the kill is dropped
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


class RequestLog:
    """Sampled, rotating, non-blocking request log.

    :param directory: where the files go (a mounted volume in the container).
    :param sample_rate: fraction of requests logged, 0..1.
    :param rotate_bytes: rotate when the open file reaches this size.
    :param rotate_s: rotate when the open file is this old (so readers see recent data).
    :param max_files: keep at most this many complete files (oldest deleted).
    :param queue_size: pending samples; beyond it samples are dropped (counted in ``dropped``).
    """

    def __init__(self, directory: str | os.PathLike[str], *, sample_rate: float = 0.1,
                 rotate_bytes: int = 64 << 20, rotate_s: float = 60.0, max_files: int = 1000,
                 queue_size: int = 1024, seed: int | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within 0..1, got {sample_rate}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")  # fail at start, not on the first sample, when it is not writable
        probe.unlink()
        self.sample_rate = float(sample_rate)
        self.rotate_bytes = int(rotate_bytes)
        self.rotate_s = float(rotate_s)
        self.max_files = int(max_files)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._rng = random.Random(seed)
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
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
        """Hand one request's images and outputs to the writer; never blocks.

        :returns: ``False`` if the sample was dropped (queue full or log closed).
        """
        if self._stop.is_set():
            return False
        try:
            self._queue.put_nowait((pixels, outputs, meta, time.time()))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, close and publish the open file."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    # -- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=max(0.5, min(self.rotate_s, 5.0)))
            except queue.Empty:
                item = False
            if item is None:
                break
            if item is not False:
                try:
                    pixels, outputs, meta, ts = item
                    lines = [json.dumps(r, separators=(",", ":"), allow_nan=False)
                             for r in build_records(pixels, outputs, timestamp=ts, **meta)]
                    self._write("\n".join(lines) + "\n")
                    self.written += len(lines)
                except Exception as exc:  # noqa: BLE001 - logging must never take the server down
                    self.failed += 1
                    log.warning("request log: could not write a sample: %s: %s", type(exc).__name__, exc)
            if self._file is not None and time.monotonic() - self._opened >= self.rotate_s:
                self._publish()
        self._publish()

    def _write(self, text: str) -> None:
        if self._file is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            self._seq += 1
            self._path = self.directory / f"requests-{stamp}-{self._writer}-{self._seq:05d}.jsonl.part"
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across writes
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while we write it
            self._opened = time.monotonic()
        self._file.write(text)
        self._file.flush()
        if self._file.tell() >= self.rotate_bytes:
            self._publish()

    def _publish(self) -> None:
        if self._file is None or self._path is None:
            return
        final = self._path.with_suffix("")  # drop .part
        try:
            # renamed while still locked: a starting server's recover_orphans never takes it over
            os.replace(self._path, final)
        except OSError as exc:  # the log must never stop the writer thread
            self.failed += 1
            log.warning("request log: could not publish %s: %s", self._path, exc)
        finally:
            self._file.close()
            self._file, self._path = None, None
        files = sorted(self.directory.glob(FILE_GLOB))
        for old in files[: max(0, len(files) - self.max_files)]:
            try:
                old.unlink()
            except OSError:
                pass


