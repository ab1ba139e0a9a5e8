"""One inter-process lock for the shared writes of Nightshift: ``flock`` on a file.

The kernel releases an ``flock`` when its holder's process dies (a killed task, a
SIGKILLed worker), so no lock ever needs a stale-lock timeout; the holder writes who
it is (pid, host, since, purpose) into the file, and a writer that waits too long
gets an error naming it. Used by the champion lock (:mod:`nightshift.champion`) and by
collection (:mod:`nightshift.data.collect`, one collection of a source at a time).

No Airflow here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from nightshift.errors import NightshiftError

log = logging.getLogger(__name__)


class LockTimeout(NightshiftError):
    """Another holder kept the lock for longer than the timeout. Retryable: the holder
    finishes (or dies, and the kernel releases its lock)."""

    retryable = True


def holder_text(fd: int) -> str:
    """Who holds the lock open on ``fd``, as the holder recorded it."""
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        h = json.loads(raw) if raw else {}
        return (f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
                + (f" ({h['purpose']})" if h.get("purpose") else ""))
    except (OSError, ValueError):
        return "an unknown holder"


@contextmanager
def file_lock(path: str | os.PathLike, *, timeout_s: float, purpose: str = "", what: str = "the lock",
              hint: str = "", error: type[LockTimeout] = LockTimeout,
              on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    :param purpose: recorded in the file, quoted to a writer that waits.
    :param what: names the lock in messages (``"the champion lock of 'digits'"``).
    :param hint: appended to the timeout error (what the holder is doing, what to do).
    :param error: the :class:`LockTimeout` subclass raised on timeout.
    :param on_wait: called once when the lock is busy and this writer starts waiting.
    :raises LockTimeout: (``error``) not acquired within ``timeout_s``; names the holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if not waited:
                waited = True
                log.info("%s (%s) is held by %s: waiting up to %.0fs", what, path, holder_text(fd), timeout_s)
                if on_wait is not None:
                    on_wait()
            if time.monotonic() >= deadline:
                raise error(f"{what} ({path}) is held by {holder_text(fd)}; waited {timeout_s:.0f}s." +
                            (f" {hint}" if hint else ""))
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose[:200],
                                  "since": datetime.now(timezone.utc).isoformat()}).encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
