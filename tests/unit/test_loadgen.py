"""The load client (:mod:`nightshift.loadgen`, an asyncio protocol): it reads responses that
arrive in pieces, honours ``Connection: close`` and counts a broken answer as a connection
error instead of crashing. Each run is bounded by its number of requests; its duration only
bounds a hang."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nightshift.loadgen import run_load


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
        assert self.ready.wait(60), "the scripted server did not start"
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
#: a run ends after its ``max_requests``; the duration and the per-request timeout only bound a hang
UNHURRIED = {"duration_s": 60, "warmup_s": 0, "timeout_s": 10}


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

    with _ScriptedServer(respond) as url:
        res = run_load(url, REQUEST, concurrency=2, max_requests=20, **UNHURRIED).summary()
    assert res["ok"] > 10 and res["errors"] == 0 and res["connection_errors"] == 0 and res["timeouts"] == 0


def test_load_client_reconnects_after_connection_close():
    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # and hang up, as announced

    srv = _ScriptedServer(respond)
    with srv as url:
        res = run_load(url, REQUEST, concurrency=1, max_requests=8, **UNHURRIED).summary()
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

    with _ScriptedServer(respond) as url:
        res = run_load(url, REQUEST, concurrency=1, max_requests=3, **UNHURRIED).summary()
    assert res["ok"] == 0 and res["connection_errors"] >= 2 and res["timeouts"] == 0
    assert any(needle in s for s in res["error_samples"]), res["error_samples"]


def test_the_client_protocol_parses_an_answer_fed_byte_by_byte():
    """The network may join the pieces the scripted server sends; here every byte of an
    answer reaches the protocol on its own, and the answer completes with the last one."""
    from nightshift.loadgen import _Connection

    class Transport:
        def __init__(self):
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def close(self) -> None:
            pass

    answer = b"HTTP/1.1 200 OK\r\nContent-Ty" b"pe: text/plain\r\nCONTENT-LENGTH: 5\r\n\r\nhello"

    async def main():
        conn = _Connection()
        conn.connection_made(Transport())
        fut = conn.request(REQUEST)
        for i in range(len(answer)):
            assert not fut.done(), f"answered after {i} of {len(answer)} bytes"
            conn.data_received(answer[i:i + 1])
        return await fut, conn.transport.sent

    (status, body, close), sent = asyncio.run(main())
    assert (status, body, close) == (200, b"hello", False)
    assert sent == [REQUEST]


def test_loadgen_binary_against_the_server(serving_server, serving_eval_set):
    from nightshift.loadgen import infer_request, run_load

    images, _ = serving_eval_set
    req = infer_request(serving_server.url, "tiny", images[:1], binary=True)
    # the session's server may be fresh here (this module runs before the serving tests): what is
    # measured is the client's counting against a warm server, not the server's first requests
    run_load(serving_server.url, req, concurrency=4, max_requests=40, **UNHURRIED)
    # bounded by the number of requests, not by a duration: a slow machine sends as many
    run = run_load(serving_server.url, req, concurrency=4, max_requests=200, **UNHURRIED)
    res = run.summary()
    assert res["requests"] == res["ok"] == 200, res
    assert res["errors"] == res["connection_errors"] == res["timeouts"] == res["rejected_503"] == 0, res
    assert res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] <= res["latency_ms"]["max"]
    # over the measured duration (the summary's duration_s is rounded to the millisecond)
    assert res["throughput_rps"] == pytest.approx(run.ok / run.duration_s, abs=0.005)
    bad = infer_request(serving_server.url, "nope", images[:1], binary=False)
    res = run_load(serving_server.url, bad, concurrency=2, max_requests=20, **UNHURRIED).summary()
    assert res["ok"] == 0 and res["errors"] == res["requests"] == 20 and res["status_counts"].keys() == {"404"}
    assert "HTTP 404" in res["error_samples"][0]


def test_loadgen_refuses_non_loopback_and_counts_timeouts():
    import socket as _socket

    from nightshift.errors import ConfigError
    from nightshift.loadgen import run_load

    with pytest.raises(ConfigError, match="only target loopback"):
        run_load("http://10.0.0.1:8080", b"", concurrency=1, duration_s=1)
    with _socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        res = run_load(url, b"GET / HTTP/1.1\r\n\r\n", concurrency=2, duration_s=0.6, timeout_s=0.25,
                       warmup_s=0).summary()
    assert res["timeouts"] >= 2 and res["ok"] == 0
    # when each timed-out request was sent (a stall shows as many timeouts at one moment): during
    # the run; one sent at its very end times out after it, within the request timeout
    assert len(res["timeout_at_s"]) == res["timeouts"] and all(0 <= t <= 0.6 + 0.25 for t in res["timeout_at_s"])
