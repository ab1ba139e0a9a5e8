"""Dynamic batching (:mod:`nightshift.serving.batching`): coalescing and splitting, instances,
the queue's limits, and the hand-offs of the hot path.

The batcher hands a batch's answers to the event loop in one thread-safe call, wakes no
worker after a request it ran inline, and takes no more than its share of the queue when
several instances run. Slow models are events the test opens, and time is a fake clock:
nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from nightshift.serving import batching
from nightshift.serving.batching import DynamicBatcher
from nightshift.serving.errors import Overloaded


class _FakeClock:
    """The batcher's ``clock``: seconds that pass only when the test says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _gated_predict(calls: list[int], gate: threading.Event, clock: _FakeClock | None = None, step_s: float = 0.0):
    """A slow model the test controls: each call waits for ``gate`` and, with ``clock``, takes
    ``step_s`` of its time. Each image's logits row holds its first pixel."""

    def predict(pixels):
        calls.append(len(pixels))
        assert gate.wait(30), "the test never opened the gate"
        if clock is not None:
            clock.advance(step_s)
        return {"logits": np.zeros((len(pixels), 3), np.float32) + pixels.reshape(len(pixels), -1)[:, :1]}

    return predict


def test_batcher_coalesces_and_splits_in_order():
    calls: list[int] = []
    gate = threading.Event()  # the first batch runs until all twelve requests are queued
    b = DynamicBatcher(_gated_predict(calls, gate), max_batch_size=8, max_queue_delay_ms=20).start()

    async def main():
        xs = [np.full((1, 2, 2, 1), i, np.uint8) for i in range(12)]
        tasks = [asyncio.ensure_future(b.submit(v)) for v in xs]
        await asyncio.sleep(0)  # every submit has run up to its wait: all twelve are queued (or running)
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    b.stop()
    assert [int(r.outputs["logits"][0, 0]) for r in results] == list(range(12))  # each got its own row
    assert max(calls) > 1 and sum(calls) == 12 and max(calls) <= 8
    assert max(r.batch_size for r in results) == max(calls)


@pytest.mark.parametrize("instances", [1, 2])
def test_batcher_instances_run_batches_at_once(instances):
    """``instances`` workers run that many batches at the same time on one predict function:
    with two, two single-image batches meet inside predict (the barrier passes); with one
    they cannot, and the barrier's timeout fails them (1 s: they never meet, so its length
    decides nothing; with two it only bounds a hang)."""
    barrier = threading.Barrier(2, timeout=1.0 if instances == 1 else 30.0)
    running, peak = [0], [0]
    lock = threading.Lock()

    def predict(pixels):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            barrier.wait()
        finally:
            with lock:
                running[0] -= 1
        return {"logits": np.zeros((len(pixels), 3), np.float32)}

    b = DynamicBatcher(predict, max_batch_size=1, instances=instances).start()

    async def main():
        return await asyncio.gather(*(b.submit(np.zeros((1, 2, 2, 1), np.uint8)) for _ in range(2)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    assert peak[0] == instances
    failed = [r for r in results if isinstance(r, Exception)]
    assert (not failed) if instances == 2 else (len(failed) >= 1)


def test_batcher_queue_full_is_overloaded():
    calls: list[int] = []
    gate = threading.Event()  # the batch that runs holds the worker until all six were submitted
    # only the queue's size refuses here: no request can wait past max_queue_wait_ms
    b = DynamicBatcher(_gated_predict(calls, gate), max_batch_size=1, max_queue_size=2,
                       max_queue_wait_ms=600_000).start()

    async def main():
        tasks = [asyncio.ensure_future(b.submit(np.zeros((1, 2, 2, 1), np.uint8))) for _ in range(6)]
        await asyncio.sleep(0)  # every submit has queued its request or been refused
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert rejected and all(r.retry_after_s >= 1 for r in rejected)
    assert len(results) - len(rejected) == len(calls) >= 2


def test_batcher_sheds_requests_that_would_wait_too_long():
    calls: list[int] = []
    clock, gate = _FakeClock(), threading.Event()
    gate.set()
    b = DynamicBatcher(_gated_predict(calls, gate, clock, 0.1), max_batch_size=1, max_queue_wait_ms=150,
                       clock=clock).start()

    async def main():
        await b.submit(np.zeros((1, 2, 2, 1), np.uint8))  # teaches the batcher 0.1 s (fake) per image
        gate.clear()  # the next batch holds the worker until all eight were submitted
        tasks = [asyncio.ensure_future(b.submit(np.zeros((1, 2, 2, 1), np.uint8))) for _ in range(8)]
        await asyncio.sleep(0)  # every submit has queued its request or been shed
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    shed = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert shed and served and len(shed) + len(served) == 8
    assert all(r.queue_s <= 0.15 + 0.05 for r in served)  # nobody waited much past the limit
    assert any("ms of work" in r.message or "waited" in r.message for r in shed)
    assert len(calls) == 1 + len(served)  # shed requests were never run
    assert b._running == 0  # dropped batches leave the running count as it was (inline path stays usable)


# ----------------------------------------------------------------------------- hand-offs


class _CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def test_a_batch_is_handed_to_the_loop_in_one_call(monkeypatch):
    groups: list[int] = []
    real = batching._resolve_all

    def counting(answers):
        groups.append(len(answers))
        real(answers)

    monkeypatch.setattr(batching, "_resolve_all", counting)
    gate = threading.Event()
    calls: list[int] = []

    def predict(pixels):
        calls.append(len(pixels))
        gate.wait(60)  # the first batch holds the worker until the other eight are queued (60 s: a hang)
        return {"logits": pixels.reshape(len(pixels), -1)[:, :1].astype(np.float32)}

    b = DynamicBatcher(predict, max_batch_size=16, max_queue_delay_ms=0).start()

    async def main():
        first = asyncio.ensure_future(b.submit(np.full((1, 1, 1, 1), 100, np.uint8)))
        while not calls:
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(b.submit(np.full((1, 1, 1, 1), i, np.uint8))) for i in range(8)]
        while b.depth < 8:
            await asyncio.sleep(0.005)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    b.stop()
    assert calls == [1, 8]
    assert groups == [1, 8]  # one hand-off per batch, holding every request's answer
    assert int(first.outputs["logits"][0, 0]) == 100
    assert [int(r.outputs["logits"][0, 0]) for r in rest] == list(range(8))
    assert all(r.batch_size == 8 for r in rest)


def test_a_failed_batch_reaches_every_request_in_one_call(monkeypatch):
    groups: list[int] = []
    real = batching._resolve_all
    monkeypatch.setattr(batching, "_resolve_all", lambda a: (groups.append(len(a)), real(a)))
    gate = threading.Event()
    seen: list[int] = []

    def predict(pixels):
        seen.append(len(pixels))
        gate.wait(60)  # until the other three are queued (60 s only bounds a hang)
        raise RuntimeError("boom")

    b = DynamicBatcher(predict, max_batch_size=16, max_queue_delay_ms=0).start()

    async def main():
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1, 1, 1), np.uint8)))
        while not seen:
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(b.submit(np.zeros((1, 1, 1, 1), np.uint8))) for _ in range(3)]
        while b.depth < 3:
            await asyncio.sleep(0.005)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    assert groups == [1, 3]
    assert all(type(r).__name__ == "InferenceFailed" and "RuntimeError: boom" in str(r) for r in results)


def test_requests_run_inline_wake_no_worker():
    """At concurrency 1 the loop runs the model itself; the idle workers must not be woken
    after every request (two context switches each, for nothing)."""
    b = DynamicBatcher(lambda p: {"logits": np.zeros((len(p), 2), np.float32)}, instances=2)
    b._cond = cond = _CountingCondition()
    b.concurrent_requests = lambda: 1
    b.start()

    async def main():
        return [await b.submit(np.zeros((1, 1, 1, 1), np.uint8)) for _ in range(50)]

    results = asyncio.run(main())
    assert len(results) == 50 and all(r.batch_size == 1 for r in results)
    assert cond.notified == 0
    b.stop()
    assert cond.notified >= 1  # stopping does wake them


# ----------------------------------------------------------------------------- a batch's share of the queue


def _queued_then_started(batcher: DynamicBatcher, sizes: list[int]) -> list:
    """Queue requests of ``sizes`` images before any worker runs, then start the workers."""

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(np.full((n, 1, 1, 1), i, np.uint8)))
                 for i, n in enumerate(sizes)]
        await asyncio.sleep(0)  # every submit has run up to its wait: all are queued (no worker runs yet)
        assert batcher.depth == sum(sizes)
        batcher.start()
        return await asyncio.gather(*tasks)

    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def _recording_predict(calls: list[int], lock: threading.Lock):
    def predict(pixels):
        with lock:
            calls.append(len(pixels))
        threading.Event().wait(0.02)  # both workers are inside predict at once
        return {"logits": pixels.reshape(len(pixels), 1).astype(np.float32)}

    return predict


@pytest.mark.parametrize(("instances", "share"), [(1, True), (2, True), (2, False)])
def test_a_batch_takes_at_most_its_share_of_the_queue(instances, share):
    """With two instances, the first batch takes half of the 8 waiting images, not all of
    them: a batch that empties the queue leaves the other instance idle (docs/serving.md).
    One instance, or the rule turned off (NIGHTSHIFT_BATCH_SHARE=0), takes all 8 in one
    batch, as max_batch_size allows."""
    calls: list[int] = []
    b = DynamicBatcher(_recording_predict(calls, threading.Lock()), max_batch_size=32, max_queue_delay_ms=0,
                       instances=instances, share_queue=share)
    results = _queued_then_started(b, [1] * 8)
    assert [int(r.outputs["logits"][0, 0]) for r in results] == list(range(8))  # each got its own row
    assert sum(calls) == 8
    if instances == 2 and share:
        # 4 of the 8, then 2 of the 4 left, then 1 and 1 -- in whichever order the two
        # workers reach predict (a later batch may get there first)
        assert sorted(calls) == [1, 1, 2, 4] and max(calls) == 4 and len(calls) >= 3
    else:
        assert calls == [8]


def test_a_request_larger_than_its_share_runs_whole():
    calls: list[int] = []
    b = DynamicBatcher(_recording_predict(calls, threading.Lock()), max_batch_size=32, max_queue_delay_ms=0,
                       instances=2)
    results = _queued_then_started(b, [5, 1])
    assert sorted(calls) == [1, 5]  # the 5-image request is one batch although the share is 3
    assert [r.outputs["logits"].shape[0] for r in results] == [5, 1]
