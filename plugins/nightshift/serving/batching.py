"""Dynamic batching: concurrent requests coalesced into one ONNX Runtime call.

Standard library + numpy only (copied into the inference image).

Triton semantics: requests wait in a bounded queue; a worker thread takes
the oldest, then adds queued requests while the batch stays within
``max_batch_size`` images and, with several instances, within its share of
the waiting images (:meth:`DynamicBatcher._share`). ``instances`` worker
threads (Triton's instance group count) run batches at the same time on the
one ONNX Runtime session, whose ``run`` is thread-safe: with one intra-op thread each, a model that
gains little from larger batches on a CPU (a small CNN is compute-bound at
batch 1) still uses every core under load. It waits up to ``max_queue_delay_ms`` for more only
while other requests are known to be on their way (accepted by the HTTP layer
but not yet queued), so a lone client (concurrency 1) never pays the delay.
When the queue holds ``max_queue_size`` images, or the images already waiting
would take longer than ``max_queue_wait_ms`` to run at the measured speed,
:meth:`DynamicBatcher.submit` raises :class:`~serving.errors.Overloaded`
(503 + ``Retry-After``) instead of letting latency grow without bound; a
request that still waited longer than that when the worker reaches it is
answered 503 too, not run (its client has likely given up).

ONNX Runtime releases the GIL while it runs, so the event loop keeps parsing
the next requests while a batch executes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import InferenceError, InferenceFailed, Overloaded

log = logging.getLogger("nightshift.serving")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_MS = 2.0
DEFAULT_MAX_QUEUE_SIZE = 1024
DEFAULT_MAX_QUEUE_WAIT_MS = 1000.0


@dataclass
class BatchResult:
    """One request's slice of a batch's outputs, with its timings."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Item:
    pixels: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


def _resolve(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():  # the client went away and the handler was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _resolve_all(answers: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for fut, value, exc in answers:
        _resolve(fut, value, exc)


def _deliver(answers: list[tuple[_Item, Any, BaseException | None]]) -> None:
    """Hand a batch's answers to their event loops: one thread-safe call per loop, not one
    per request (each call is a wake-up write and a GIL hand-off on the loop's side)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any, BaseException | None]]] = {}
    for item, value, exc in answers:
        by_loop.setdefault(item.loop, []).append((item.future, value, exc))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, group)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


class DynamicBatcher:
    """Coalesce :meth:`submit` calls into batched ``predict`` calls on one worker thread.

    :param predict: ``uint8 NHWC -> {output name: array}`` (``Model.predict``).
    :param max_batch_size: most images in one ``predict`` call; ``1`` disables batching.
    :param max_queue_delay_ms: longest a batch waits for requests that are on their way.
    :param max_queue_size: most images waiting; beyond it, :class:`Overloaded`.
    :param max_queue_wait_ms: longest a request may wait for its batch (estimated at
        admission from the measured per-image time, enforced when the batch forms).
    :param observe: optional ``(batch_images, inference_s)`` callback per batch (metrics).
    :param instances: batches that may run at once (worker threads).
    :param share_queue: with several instances, a batch takes at most its share of the
        waiting images (:meth:`_share`); ``False``: as many as ``max_batch_size`` allows.
    :param clock: seconds, monotonic (:func:`time.perf_counter`); tests pass a fake one.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_queue_wait_ms: float = DEFAULT_MAX_QUEUE_WAIT_MS,
        observe: Callable[[int, float], None] | None = None,
        instances: int = 1,
        share_queue: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        self.predict = predict
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_ms) / 1000.0
        self.max_queue_size = int(max_queue_size)
        self.max_queue_wait_s = float(max_queue_wait_ms) / 1000.0
        self.instances = int(instances)
        self.share_queue = bool(share_queue)
        self._clock = clock
        self._per_image_s = 0.0  # moving average of inference time per image
        self.expired = 0  # requests answered 503 because they waited too long
        self.observe = observe
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._incoming = 0  # requests announced (expect()) but not yet submitted
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # batches (or an inline call) running now
        #: ``() -> requests the HTTP server is handling now`` (uvicorn's task count); when set and
        #: it reports 1 and nothing is queued or running, the request runs inline (see :meth:`_inline`)
        self.concurrent_requests: Callable[[], int] | None = None
        self._threads: list[threading.Thread] = []

    # -- client side (event loop) -----------------------------------------------------

    @property
    def depth(self) -> int:
        """Images waiting in the queue."""
        return self._queued_images

    def expect(self) -> None:
        """Announce a request whose body is being read (lets the batch wait for it)."""
        with self._cond:
            self._incoming += 1

    def unexpect(self) -> None:
        """The announced request was submitted or abandoned."""
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._cond.notify()

    async def submit(self, pixels: np.ndarray, *, announced: bool = False) -> BatchResult:
        """Queue one request's images and wait for its outputs.

        :param announced: the request was announced with :meth:`expect`; queuing it
            ends the announcement (also when the queue is full).

        :raises Overloaded: the queue is full.
        :raises InferenceFailed: the batch failed.
        """
        loop = asyncio.get_running_loop()
        item = _Item(pixels, loop.create_future(), loop, self._clock())
        n = int(pixels.shape[0])
        with self._cond:
            if announced:
                self._incoming = max(0, self._incoming - 1)
            probe = self.concurrent_requests
            inline = (probe is not None and not self._running and not self._queue and self._incoming == 0
                      and not self._stopping and probe() <= 1)
            if inline:
                self._running += 1
        if inline:
            return self._inline(item)
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after_s=1)
            if self._queued_images + n > self.max_queue_size:
                raise Overloaded(
                    f"the batching queue is full ({self._queued_images} images waiting, limit "
                    f"{self.max_queue_size}); retry later", retry_after_s=1)
            expected = self._queued_images * self._per_image_s / self.instances
            if self._queued_images and expected > self.max_queue_wait_s:
                raise Overloaded(
                    f"the batching queue holds {self._queued_images} images, about {expected * 1000:.0f} ms of "
                    f"work (limit {self.max_queue_wait_s * 1000:.0f} ms); retry later", retry_after_s=1)
            self._queue.append(item)
            self._queued_images += n
            self._cond.notify()
        return await item.future

    def _inline(self, item: _Item) -> BatchResult:
        # The only request the HTTP server has (nothing queued, nothing running,
        # nobody on the way): run on the event loop's thread and skip two thread
        # hand-offs (~0.3 ms at concurrency 1). The loop is blocked for one
        # inference, as long as a newcomer would have waited for the worker
        # anyway; requests that arrive meanwhile find several requests in
        # flight and go through the queue, so they are batched.
        start = self._clock()
        try:
            outputs = self.predict(item.pixels)
        except InferenceError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("inference failed")
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._cond:
                self._running -= 1
                if self._queue:  # a worker held back by the running count may go on
                    self._cond.notify()
        elapsed = self._clock() - start
        n = int(item.pixels.shape[0])
        self._learn(elapsed, n)
        if self.observe is not None:
            self.observe(n, elapsed)
        return BatchResult(outputs, start - item.enqueued, elapsed, n)

    def _learn(self, seconds: float, images: int) -> None:
        per = seconds / max(1, images)
        self._per_image_s = per if self._per_image_s == 0.0 else 0.9 * self._per_image_s + 0.1 * per

    # -- worker side --------------------------------------------------------------------

    def start(self) -> "DynamicBatcher":
        """Start the worker threads (idempotent)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name=f"batcher-{i}", daemon=True)
                             for i in range(self.instances)]
            for t in self._threads:
                t.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the queued requests, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue or self._running >= self.instances:
                if self._stopping and not self._queue:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            self._queued_images -= int(first.pixels.shape[0])
            if self._expired(first):
                return []
            batch, size = [first], int(first.pixels.shape[0])
            deadline = first.enqueued + self.max_queue_delay_s
            cap = self._share(size)
            while size < cap:
                if self._queue:
                    n = int(self._queue[0].pixels.shape[0])
                    if size + n > cap:
                        break
                    item = self._queue.popleft()
                    self._queued_images -= n
                    if not self._expired(item):
                        batch.append(item)
                        size += n
                    continue
                remaining = deadline - self._clock()
                if self._incoming <= 0 or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._running += 1
            return batch

    def _share(self, first: int) -> int:
        """Most images the batch being formed may hold (called under the lock).

        ``max_batch_size``, and with several instances no more than this batch's share of
        the images waiting, ``ceil(waiting / instances)`` (a request on its way counts as
        one image): a batch that took the whole queue left the other instances idle until
        its answers went out and the next requests came in, and then every instance started
        at once. Measured with two instances at concurrency 16 (``bench/serving_ab.py``,
        ``docs/benchmarks.md``): +10% throughput for small_cnn, +4% for resnet18. One
        instance, or ``share_queue=False``, takes what ``max_batch_size`` allows.
        """
        if self.instances == 1 or not self.share_queue:
            return self.max_batch_size
        waiting = first + self._queued_images + self._incoming
        # a first request larger than the share still runs whole: _take adds nothing to it
        return min(self.max_batch_size, -(-waiting // self.instances))

    def _expired(self, item: _Item) -> bool:
        """Drop a request whose client is gone or that waited too long (called under the lock)."""
        if item.future.done():  # cancelled: the handler is gone
            return True
        waited = self._clock() - item.enqueued
        if waited <= self.max_queue_wait_s:
            return False
        self.expired += 1
        exc = Overloaded(f"the request waited {waited * 1000:.0f} ms for a batch (limit "
                         f"{self.max_queue_wait_s * 1000:.0f} ms); retry later", retry_after_s=1)
        item.loop.call_soon_threadsafe(_resolve, item.future, None, exc)
        return True

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:  # every request it took had expired: nothing runs, nothing was counted
                continue
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    if self._queue or self._stopping:  # wake a worker only when one has something to do
                        self._cond.notify_all()

    def _execute(self, batch: list[_Item]) -> None:
        start = self._clock()
        try:
            pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([i.pixels for i in batch])
            outputs = self.predict(pixels)
        except InferenceError as exc:
            _deliver([(item, None, exc) for item in batch])
            return
        except Exception as exc:  # noqa: BLE001 - must reach every waiting request
            log.exception("batch of %d request(s) failed", len(batch))
            err = InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")
            _deliver([(item, None, err) for item in batch])
            return
        elapsed = self._clock() - start
        total = sum(int(i.pixels.shape[0]) for i in batch)
        self._learn(elapsed, total)
        if self.observe is not None:
            self.observe(total, elapsed)
        answers = []
        lo = 0
        for item in batch:
            n = int(item.pixels.shape[0])
            part = {k: v[lo:lo + n] for k, v in outputs.items()}
            lo += n
            answers.append((item, BatchResult(part, start - item.enqueued, elapsed, total), None))
        _deliver(answers)
