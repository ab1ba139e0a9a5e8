"""A bounded load generator for the inference server (OIP, binary or JSON), loopback only.

No Airflow. ``N`` concurrent clients, each on its own keep-alive connection,
send the same pre-encoded infer request back to back for ``T`` seconds on one
asyncio event loop (uvloop when installed): a client that costs little CPU, so
on a 2-core machine most of the CPU goes to the server being measured. Every
request has a deadline; a request past it is a *timeout* (the connection is
dropped and reopened), a 503 from a full queue is counted apart from other
errors. Used by SystemEval's load phase and by ``bench/serving.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from nightshift.errors import ConfigError

#: Latencies kept per run for percentiles and the histogram (bounded memory).
MAX_SAMPLES = 200_000


def infer_request(url: str, model_name: str, batch: np.ndarray, *, input_name: str = "pixels",
                  binary: bool = True, outputs: tuple[str, ...] = ("logits",)) -> bytes:
    """The raw HTTP/1.1 bytes of one ``POST /v2/models/{model_name}/infer``.

    :param binary: binary tensor data extension in and out (else JSON both ways).
    """
    u = urlsplit(url)
    batch = np.ascontiguousarray(batch, dtype=np.uint8)
    tensor: dict[str, Any] = {"name": input_name, "shape": list(batch.shape), "datatype": "UINT8"}
    extra = b""
    if binary:
        raw = batch.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        outs = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    else:
        tensor["data"] = batch.reshape(-1).tolist()
        outs = [{"name": o} for o in outputs]
    header = json.dumps({"inputs": [tensor], "outputs": outs}, separators=(",", ":")).encode()
    body = header + (raw if binary else b"")
    if binary:
        extra = f"Inference-Header-Content-Length: {len(header)}\r\n".encode()
    head = (f"POST /v2/models/{model_name}/infer HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            f"Content-Type: {'application/octet-stream' if binary else 'application/json'}\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n"
    return head + body


def require_loopback(url: str) -> tuple[str, int]:
    """Host and port of ``url``; refuses anything but a loopback address (fail closed)."""
    u = urlsplit(url)
    try:
        if u.hostname != "localhost" and not ipaddress.ip_address(u.hostname or "").is_loopback:
            raise ValueError
    except ValueError:
        raise ConfigError(f"load tests only target loopback addresses (127.0.0.0/8, ::1); got {url!r}") from None
    return u.hostname or "127.0.0.1", int(u.port or 80)


@dataclass
class LoadResult:
    """What one load run measured."""

    concurrency: int
    duration_s: float
    images_per_request: int
    latencies_ms: list[float] = field(default_factory=list)
    status_counts: dict[int, int] = field(default_factory=dict)
    timeouts: int = 0
    #: seconds after the start of recording at which each timed-out request was sent (when stalls happen)
    timeout_at_s: list[float] = field(default_factory=list)
    connection_errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.status_counts.get(200, 0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: requests, ok, errors, 503s, timeouts, throughput, latency percentiles."""
        total = sum(self.status_counts.values()) + self.timeouts + self.connection_errors
        rejected = self.status_counts.get(503, 0)
        errors = total - self.ok - rejected
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = ({f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 95, 99)}
               | {"mean": round(float(lat.mean()), 3), "max": round(float(lat.max()), 3)}) if lat.size else \
            {"p50": None, "p90": None, "p95": None, "p99": None, "mean": None, "max": None}
        return {
            "concurrency": self.concurrency, "duration_s": round(self.duration_s, 3), "requests": total,
            "ok": self.ok, "errors": errors, "rejected_503": rejected, "timeouts": self.timeouts,
            "connection_errors": self.connection_errors,
            "error_rate": round(errors / total, 6) if total else None,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "throughput_rps": round(self.ok / self.duration_s, 2) if self.duration_s > 0 else None,
            "throughput_ips": round(self.ok * self.images_per_request / self.duration_s, 2)
            if self.duration_s > 0 else None,
            "latency_ms": pct, "error_samples": self.error_samples[:5],
            "timeout_at_s": sorted(round(t, 2) for t in self.timeout_at_s)[:200],
        }


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that answers one request at a time.

    A protocol, not asyncio streams: no reader/writer objects, no ``readuntil``
    buffers, one future per request. On a shared machine the client's CPU per
    request is taken from the server it measures (about a third less than the
    streams version, ``docs/benchmarks.md``).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or asyncio.IncompleteReadError(bytes(self.buf), None))

    def _parse(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        try:
            status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                length = 0
            else:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17:j if j > 0 else len(head)])
            if i < 0 and b"\r\ntransfer-encoding: chunked" in head:  # e.g. KServe's binary replies
                chunked = dechunk(buf, end + 4)
                if chunked is None:
                    return
                body, total = chunked
                del buf[:total]
                self.waiter.set_result((status, body, b"\r\nconnection: close" in head))
                return
        except ValueError as exc:
            self.waiter.set_exception(ValueError(f"malformed response head {head[:200]!r}: {exc}"))
            return
        total = end + 4 + length
        if len(buf) < total:
            return
        body = bytes(buf[end + 4:total])
        del buf[:total]
        self.waiter.set_result((status, body, b"\r\nconnection: close" in head))

    def request(self, data: bytes) -> asyncio.Future:
        self.waiter = fut = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        if self.buf:
            self._parse()
        return fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def dechunk(buf: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    """A ``Transfer-Encoding: chunked`` body that begins at ``buf[start]``: ``(body, end)``, ``end``
    the offset just past its last CRLF, or ``None`` while it has not all arrived. Trailers are
    not supported (no server this client measures sends them). Raises ``ValueError`` on a
    malformed chunk size."""
    parts, pos = [], start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            return (b"".join(parts), eol + 4) if len(buf) >= eol + 4 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        parts.append(bytes(buf[eol + 2:eol + 2 + size]))
        pos = eol + 2 + size + 2


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _client(host: str, port: int, request: bytes, deadline: float, timeout_s: float, result: LoadResult,
                  record_from: float, max_requests: int | None, counter: list[int]) -> None:
    loop = asyncio.get_running_loop()
    conn: _Connection | None = None
    try:
        while time.perf_counter() < deadline and (max_requests is None or counter[0] < max_requests):
            counter[0] += 1
            t0 = time.perf_counter()
            # one timer handle per request, not asyncio.timeout's task cancellation: the
            # client's CPU is part of every latency it measures on a shared machine
            timer = None
            try:
                if conn is None or conn.lost:
                    _, conn = await asyncio.wait_for(loop.create_connection(_Connection, host, port), timeout_s)
                fut = conn.request(request)
                timer = loop.call_later(timeout_s - (time.perf_counter() - t0), _expire, fut)
                status, body, close = await fut
            except TimeoutError:
                if t0 >= record_from:
                    result.timeouts += 1
                    result.timeout_at_s.append(t0 - record_from)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if t0 >= record_from:
                    result.connection_errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(0.01)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            if t0 >= record_from:
                ms = (time.perf_counter() - t0) * 1000.0
                result.status_counts[status] = result.status_counts.get(status, 0) + 1
                if status == 200 and len(result.latencies_ms) < MAX_SAMPLES:
                    result.latencies_ms.append(ms)
                elif status not in (200, 503) and len(result.error_samples) < 5:
                    result.error_samples.append(f"HTTP {status}: {body[:200]!r}")
            if close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


def run_load(url: str, request: bytes, *, concurrency: int, duration_s: float, timeout_s: float = 2.0,
             warmup_s: float = 0.5, images_per_request: int = 1, max_requests: int | None = None) -> LoadResult:
    """Drive ``concurrency`` keep-alive clients for ``warmup_s + duration_s`` seconds.

    Requests started during the warm-up are not counted.

    :param url: the server's base URL; must be loopback.
    :param request: raw request bytes (:func:`infer_request`).
    :param max_requests: a hard cap on requests sent (bounds the run in count too).
    :raises ConfigError: a non-loopback URL or bad arguments.
    """
    host, port = require_loopback(url)
    if concurrency < 1 or duration_s <= 0 or timeout_s <= 0:
        raise ConfigError(f"run_load: concurrency >= 1, duration_s > 0 and timeout_s > 0 required; got "
                          f"{concurrency}, {duration_s}, {timeout_s}")
    result = LoadResult(concurrency=concurrency, duration_s=duration_s, images_per_request=images_per_request)

    async def main() -> None:
        start = time.perf_counter()
        record_from = start + warmup_s
        deadline = record_from + duration_s
        counter = [0]
        await asyncio.gather(*(_client(host, port, request, deadline, timeout_s, result, record_from,
                                       max_requests, counter) for _ in range(concurrency)))
        result.duration_s = max(1e-9, min(time.perf_counter(), deadline + timeout_s) - record_from)

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main())
    return result
