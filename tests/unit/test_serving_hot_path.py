"""The serving hot path's hand-offs and the load client's HTTP parsing.

The batcher hands a batch's answers to the event loop in one thread-safe call,
wakes no worker after a request it ran inline, takes no more than its share of
the queue when several instances run, and the load client (an asyncio
protocol) reads responses that arrive in pieces, honours ``Connection: close``
and counts a broken answer as a connection error instead of crashing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nightshift.serving import batching
from nightshift.serving.batching import DynamicBatcher

PLUGIN_SERVING = Path(__file__).resolve().parents[2] / "plugins" / "nightshift"


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
        gate.wait(5)  # the first batch holds the worker until the other eight are queued
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
        gate.wait(5)
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
    assert len(results) == 50 and all(r.batch_size == 1 and r.queue_s < 1 for r in results)
    assert cond.notified == 0
    b.stop()
    assert cond.notified >= 1  # stopping does wake them


def _queued_then_started(batcher: DynamicBatcher, sizes: list[int]) -> list:
    """Queue requests of ``sizes`` images before any worker runs, then start the workers."""

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(np.full((n, 1, 1, 1), i, np.uint8)))
                 for i, n in enumerate(sizes)]
        await asyncio.sleep(0.05)  # every submit has queued its request
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


@pytest.mark.parametrize(("var", "value", "message"), [
    ("NIGHTSHIFT_GIL_SWITCH_MS", "0", "NIGHTSHIFT_GIL_SWITCH_MS=0.0 is outside 0.01..100"),
    ("NIGHTSHIFT_BATCH_SHARE", "2", "NIGHTSHIFT_BATCH_SHARE=2 must be 0 or 1"),
])
def test_out_of_range_settings_are_refused(var, value, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update({var: value, "NIGHTSHIFT_PORT": "0", "PYTHONPATH": str(PLUGIN_SERVING)})
    proc = subprocess.run([sys.executable, "-m", "serving.server"], env=env, cwd=PLUGIN_SERVING,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr


# ----------------------------------------------------------------------------- load client parsing


class _ScriptedServer:
    """A loopback HTTP server whose answers are scripted per connection (in a thread)."""

    def __init__(self, respond):
        self.respond = respond
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def handle(reader, writer):
            self.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    if not await self.respond(writer):
                        break
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def start():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(5)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


REQUEST = b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc"


def test_load_client_reads_answers_that_arrive_in_pieces():
    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
        await writer.drain()
        await asyncio.sleep(0.002)
        writer.write(b"pe: text/plain\r\nCONTENT-LENGTH: 5\r\n\r\nhe")
        await writer.drain()
        await asyncio.sleep(0.002)
        writer.write(b"llo")
        return True

    from nightshift.loadgen import run_load

    with _ScriptedServer(respond) as url:
        res = run_load(url, REQUEST, concurrency=2, duration_s=0.4, warmup_s=0, timeout_s=1).summary()
    assert res["ok"] > 10 and res["errors"] == 0 and res["connection_errors"] == 0 and res["timeouts"] == 0


def test_load_client_reconnects_after_connection_close():
    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # and hang up, as announced

    from nightshift.loadgen import run_load

    srv = _ScriptedServer(respond)
    with srv as url:
        res = run_load(url, REQUEST, concurrency=1, duration_s=0.3, warmup_s=0, timeout_s=1).summary()
    assert res["ok"] > 5 and res["connection_errors"] == 0 and res["errors"] == 0
    assert srv.connections == res["ok"]  # one connection per answered request


@pytest.mark.parametrize("answer, needle", [
    (b"garbage\r\n\r\n", "malformed response head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "IncompleteReadError"),
])
def test_load_client_counts_broken_answers_as_connection_errors(answer, needle):
    async def respond(writer):
        writer.write(answer)
        await writer.drain()
        return False  # close: a short body is cut off

    from nightshift.loadgen import run_load

    with _ScriptedServer(respond) as url:
        res = run_load(url, REQUEST, concurrency=1, duration_s=0.3, warmup_s=0, timeout_s=1).summary()
    assert res["ok"] == 0 and res["connection_errors"] >= 2 and res["timeouts"] == 0
    assert any(needle in s for s in res["error_samples"]), res["error_samples"]


def test_an_upload_larger_than_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    import io
    import warnings

    from PIL import Image

    from nightshift.serving import images
    from nightshift.serving.errors import InvalidInput

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 200 - 1)
    decoded: list[bytes] = []
    monkeypatch.setattr(images._decode, "decode_image", lambda data: decoded.append(data))
    filters = list(warnings.filters)
    with pytest.raises(InvalidInput, match=r"image too large: 300x200 = 60,000 pixels; .* at most 59,999"):
        images.decode_upload(buf.getvalue(), (8, 8, 3))
    assert decoded == []  # refused before decoding
    assert warnings.filters == filters  # no process-wide warning filters touched per upload
    monkeypatch.undo()
    pixels, orig = images.decode_upload(buf.getvalue(), (8, 8, 3))
    assert pixels.shape == (1, 8, 8, 3) and orig == (200, 300, 3)


def test_loop_histogram_exposes_what_prometheus_clients_histogram_does():
    """Same observations, same ``_bucket``/``_count``/``_sum`` lines (edges included: a value
    equal to a bound counts in that bucket, beyond the last bound only in +Inf)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from nightshift.serving.metrics import LoopHistogram

    buckets = (.0005, .001, .0025, .1, 1.0, 10.0)
    values = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.05, 0.1, 3.0, 10.0, 11.0, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("h_seconds", "doc", "stage", buckets, ours)
    ref = Histogram("h_seconds", "doc", ["stage"], buckets=buckets, registry=theirs)
    for v in values:
        fast.labels("queue").observe(v)
        ref.labels("queue").observe(v)
    fast.labels("idle")
    ref.labels("idle")

    def series(reg):
        return sorted(line for line in generate_latest(reg).decode().splitlines()
                      if line.startswith("h_seconds_") and "_created" not in line)

    assert series(ours) == series(theirs)
    assert 'h_seconds_bucket{le="0.0005",stage="queue"} 3.0' in series(ours)
    assert 'h_seconds_count{stage="idle"} 0.0' in series(ours)


def test_sigterm_hands_keep_alive_clients_over_before_closing(tiny_onnx_model_dir):
    """After SIGTERM an open keep-alive connection is answered once more with
    ``Connection: close`` (the client reconnects, through a proxy to the new server)
    instead of being cut while idle; readiness says 503; then the server exits 0."""
    import http.client as httpclient
    import json
    import signal
    import time

    from nightshift.evaluation import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(port), NIGHTSHIFT_DRAIN_S="5",
               PYTHONPATH=str(PLUGIN_SERVING))
    proc = subprocess.Popen([sys.executable, "-m", "serving.server"], env=env, cwd=PLUGIN_SERVING,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
                conn.close()
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.05)
        assert resp.getheader("connection") != "close"  # keep-alive before the signal
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        other = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)  # still accepting meanwhile
        other.request("GET", "/v2/health/ready")
        r = other.getresponse()
        assert r.status == 503 and "shutting down" in json.loads(r.read())["error"]
        other.request("GET", "/v2/models/tiny/ready")  # the model's readiness says the same
        r = other.getresponse()
        assert r.status == 503 and "shutting down" in json.loads(r.read())["error"]
        other.close()
        conn.request("GET", "/v2/models/tiny")  # the idle keep-alive connection is still served
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "tiny"
        assert resp.getheader("connection") == "close"
        conn.close()
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 4.5  # ended once its clients had gone, not at the 5 s limit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
