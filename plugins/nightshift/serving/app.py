"""The ASGI application: OIP (KServe v2) REST routes, an image-upload route, ``/metrics``.

A plain ASGI callable, no web framework: the routes are few and fixed, and the
per-request cost of a framework's routing and request objects is measurable
against a 1 ms model (``docs/benchmarks.md``). uvicorn (httptools + uvloop)
does the HTTP/1.1 work; see :mod:`serving.server`.

Routes (``{m}`` = ``/v2/models/{name}`` or ``/v2/models/{name}/versions/{v}``)::

    GET  /v2                      server metadata (name, version, extensions)
    GET  /v2/health/live          200 while the process runs
    GET  /v2/health/ready         200 once the model is loaded, else 503
    GET  {m}                      model metadata
    GET  {m}/ready                200 / 503
    POST {m}/infer                OIP inference, JSON or binary tensor data
    POST {m}/classify             a PNG/JPEG file as the body -> class and probabilities
    GET  /metrics                 Prometheus metrics

Errors are JSON ``{"error": "..."}``: 400 bad input (also JSON nested deeper
than :data:`~serving.protocol.MAX_JSON_DEPTH`), 404 unknown model, version or
route, 405 wrong method, 408 body too slow, 413 body or batch too large (from
``Content-Length`` before reading; an infer body, also after decompression, is
capped at what the model's largest batch can need:
:class:`~serving.protocol.InferLimits`), 415 unsupported upload type, 503 not
ready or queue full (``Retry-After``), 500 only for server faults. Header count
and size limits (431) are the HTTP layer's (:mod:`serving.server`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

import numpy as np

from . import __version__
from .batching import DynamicBatcher
from .errors import (
    InferenceError,
    InferenceFailed,
    InvalidInput,
    LengthRequired,
    MethodNotAllowed,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    RouteNotFound,
    UnsupportedMediaType,
)
from .metrics import Metrics
from .model import Model, probabilities
from .protocol import (
    BODY_LIMIT_WHY,
    EXTENSIONS,
    HEADER_LENGTH,
    InferLimits,
    InferPlan,
    PlanCache,
    binary_outputs,
    decompress,
    encode_planned,
    parse_request,
)

log = logging.getLogger("nightshift.serving")
access_log = logging.getLogger("nightshift.serving.access")

#: Response header carrying the model's run time for one request, in milliseconds.
TIMING_HEADER = "x-inference-time-ms"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: (request headers -> the largest body in bytes, request headers -> why: the 413 message)
BodyLimits = tuple[Callable[[dict[str, str]], int], Callable[[dict[str, str]], str]]


class ClientDisconnected(Exception):
    """The client hung up before the answer; not an error."""


@dataclass
class AppConfig:
    """Tunables of one server (see :mod:`serving.server` for the environment variables)."""

    max_body_bytes: int = 64 << 20
    body_timeout_s: float = 30.0
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024
    max_queue_wait_ms: float = 1000.0
    instances: int = 1
    share_queue: bool = True
    access_log_sample: float = 0.01
    plan_cache_size: int = 256
    max_image_bytes: int = 16 << 20


class InferenceApp:
    """ASGI app serving one :class:`~serving.model.Model`.

    :param model: loaded or not; readiness follows it.
    :param config: limits and batching settings.
    :param request_log: a :class:`~serving.requestlog.RequestLog`, or ``None`` for none.
    :param metrics: a :class:`~serving.metrics.Metrics`; default a fresh registry.
    :param loader: called once (in a thread) at startup when the model is not loaded;
        raising makes the process exit 1 (see :meth:`on_load_failed`).
    """

    def __init__(self, model: Model, config: AppConfig | None = None, *, request_log: Any = None,
                 metrics: Metrics | None = None, loader: Callable[[], Any] | None = None):
        self.model = model
        self.config = config or AppConfig()
        self.request_log = request_log
        self.loader = loader
        self.load_failed: BaseException | None = None
        self.on_load_failed: Callable[[BaseException], None] | None = None
        self.metrics = metrics or Metrics()
        self.batcher = DynamicBatcher(
            model.predict, max_batch_size=self.config.max_batch_size,
            max_queue_delay_ms=self.config.max_queue_delay_ms, max_queue_size=self.config.max_queue_size,
            max_queue_wait_ms=self.config.max_queue_wait_ms, observe=self.metrics.observe_batch,
            instances=self.config.instances, share_queue=self.config.share_queue,
        )
        self.metrics.bind(self)
        #: validated JSON headers of binary infer requests (see :class:`~serving.protocol.InferPlan`)
        self._plans = PlanCache(self.config.plan_cache_size)
        #: the infer body limits of the loaded model (:class:`~serving.protocol.InferLimits`)
        self._infer_limits: InferLimits | None = None
        self._limit_by_hl: dict[str | None, int] = {}
        self._infer_limits_for: BodyLimits = (self._infer_limit, self._infer_limit_why)
        self._image_limits_for: BodyLimits = (self._image_limit, self._image_limit_why)
        self._rng = random.Random()
        self._watch: asyncio.Task | None = None
        #: set on SIGTERM while keep-alive clients are handed over: answers close their
        #: connection and readiness is 503 (see :mod:`serving.server`)
        self.draining = False
        #: servers of other protocols on this app's loop, sharing its model, batcher, metrics
        #: and request log (:class:`~serving.grpc_service.GrpcService`): ``async start()`` after
        #: the batcher starts, ``async stop()`` before it stops
        self.services: list[Any] = []
        #: why the lifespan startup failed (a service could not start), else ``None``
        self.startup_error: BaseException | None = None

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.startup()
                try:
                    for service in self.services:
                        await service.start()
                except Exception as exc:  # noqa: BLE001 - e.g. the gRPC port is taken: uvicorn exits
                    self.startup_error = exc
                    await self._stop_services()
                    await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._watch is not None:
                    self._watch.cancel()
                await self._stop_services()
                await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _stop_services(self) -> None:
        """Stop the other protocols' servers (their in-flight requests finish first), last started first."""
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:  # noqa: BLE001 - the others must still stop
                log.exception("stopping %s failed", type(service).__name__)

    def startup(self) -> None:
        """Start the batcher and the event-loop watch; load the model in the background if needed."""
        self.batcher.start()
        try:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
        except RuntimeError:  # called outside an event loop (tests)
            pass
        if not self.model.ready and self.loader is not None:
            import threading

            threading.Thread(target=self._load, name="model-load", daemon=True).start()

    async def _watch_loop(self, interval_s: float = 0.1, warn_s: float = 0.5) -> None:
        """Measure how late a timer fires: a blocked or CPU-starved event loop delays every
        request at once (``nightshift_event_loop_lag_seconds``; a WARNING past ``warn_s``)."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(interval_s)
            lag = max(0.0, loop.time() - t - interval_s)
            self.metrics.loop_lag.observe(lag)
            if lag > warn_s:
                log.warning("the event loop ran %.0f ms late: every request waited that long "
                            "(CPU starvation or blocking work on the loop)", lag * 1000)

    def _load(self) -> None:
        try:
            self.loader()
        except BaseException as exc:  # noqa: BLE001
            self.load_failed = exc
            log.error("model failed to load: %s", exc)
            if self.on_load_failed is not None:
                self.on_load_failed(exc)

    def shutdown(self) -> None:
        """Drain the batching queue and close the request log (after the HTTP server drained)."""
        self.batcher.stop()
        if self.request_log is not None:
            self.request_log.close()

    # -- HTTP -----------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        method = scope["method"]
        path = scope["path"].rstrip("/") or "/"
        route = "unknown"
        status = 500
        try:
            route, status, body, headers = await self._dispatch(method, path, scope, receive)
        except ClientDisconnected:
            self.metrics.disconnects.inc()
            return
        except InferenceError as exc:
            status = int(exc.status)
            route = getattr(exc, "route", route)
            body = json.dumps({"error": exc.message}).encode("utf-8")
            headers = {"content-type": "application/json"}
            if isinstance(exc, MethodNotAllowed):
                headers["allow"] = exc.allowed
            if isinstance(exc, Overloaded):
                headers["retry-after"] = str(exc.retry_after_s)
            if isinstance(exc, (PayloadTooLarge, RequestTimeout)):
                headers["connection"] = "close"  # the unread body would poison the connection
            if status >= 500:
                log.warning("%s %s -> %d: %s", method, path, status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug: answer 500, keep serving
            log.exception("unhandled error on %s %s", method, path)
            body = json.dumps({"error": f"internal server error: {type(exc).__name__}: {exc}"}).encode("utf-8")
            headers = {"content-type": "application/json", "connection": "close"}
            status = 500
        if self.draining:
            headers = {**headers, "connection": "close"}  # the next request opens a new connection
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw_headers.append((b"content-length", str(len(body)).encode("ascii")))
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})
        except OSError:  # the client went away while we answered
            self.metrics.disconnects.inc()
            return
        elapsed = time.perf_counter() - t0
        self.metrics.observe_request(route, method, status, elapsed)
        if self.config.access_log_sample > 0 and (status >= 500 or self._rng.random() < self.config.access_log_sample):
            client = scope.get("client") or ("-", 0)
            access_log.info("request", extra={"fields": {
                "client": client[0], "method": method, "path": path, "route": route, "status": status,
                "duration_ms": round(elapsed * 1000, 3)}})

    async def _dispatch(self, method: str, path: str, scope: Scope,
                        receive: Receive) -> tuple[str, int, bytes, dict[str, str]]:
        model = self.model
        reading = method in ("GET", "HEAD")
        if path in ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics"):
            route = {"/v2": "server_metadata", "/v2/health/live": "live", "/v2/health/ready": "ready",
                     "/metrics": "metrics"}[path]
            if not reading:
                raise _routed(MethodNotAllowed(f"{path} accepts GET, not {method}", "GET, HEAD"), route)
            if path == "/metrics":
                body, ctype = self.metrics.render()
                return route, 200, body, {"content-type": ctype}
            if path == "/v2":
                return route, 200, _json({"name": "nightshift-serving", "version": __version__,
                                          "extensions": EXTENSIONS}), _JSON
            if path == "/v2/health/live":
                return route, 200, _json({"live": True}), _JSON
            if self.draining:
                return route, 503, _json({"ready": False, "error": "the server is shutting down"}), _JSON
            if not model.ready:
                return route, 503, _json({"ready": False, "error": self._not_ready()}), _JSON
            return route, 200, _json({"ready": True}), _JSON

        parts = path.split("/")
        # ['', 'v2', 'models', name, ('versions', v)?, action?]
        if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
            raise RouteNotFound(f"no endpoint at {path!r}; try /v2/health/ready or POST /v2/models/{model.name}/infer")
        name = unquote(parts[3])
        rest = parts[4:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                raise RouteNotFound(f"no endpoint at {path!r}: /versions needs a version")
            version, rest = unquote(rest[1]), rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer", "classify")):
            raise RouteNotFound(f"no endpoint at {path!r}; model routes end in /ready, /infer or /classify")
        action = rest[0] if rest else "metadata"
        route = {"metadata": "model_metadata", "ready": "model_ready"}.get(action, action)
        if name != model.name:
            raise _routed(ModelNotFound(f"model {name!r} is not served here; this server serves {model.name!r}"),
                          route)
        if version is not None and model.ready and version != model.version:
            raise _routed(ModelNotFound(f"model {name!r} has no version {version!r}; the served version is "
                                        f"{model.version!r}"), route)
        if action in ("infer", "classify"):
            if method != "POST":
                raise _routed(MethodNotAllowed(f"{path} accepts POST, not {method}", "POST"), route)
            try:
                if action == "infer":
                    status, body, headers = await self._infer(scope, receive)
                else:
                    status, body, headers = await self._classify(scope, receive)
            except InferenceError as exc:
                raise _routed(exc, route) from None
            return route, status, body, headers
        if not reading:
            raise _routed(MethodNotAllowed(f"{path} accepts GET, not {method}", "GET, HEAD"), route)
        if action == "ready":
            if self.draining:
                return route, 503, _json({"name": name, "ready": False, "error": "the server is shutting down"}), _JSON
            if not model.ready:
                return route, 503, _json({"name": name, "ready": False, "error": self._not_ready()}), _JSON
            return route, 200, _json({"name": name, "ready": True}), _JSON
        try:
            return route, 200, _json(model.metadata()), _JSON
        except InferenceError as exc:
            raise _routed(exc, route) from None

    def _not_ready(self) -> str:
        why = self.model.load_error or "model is still loading"
        return f"model {self.model.name!r} is not ready: {why}"

    def _infer_limits_now(self) -> InferLimits | None:
        limits = self._infer_limits
        if limits is None and self.model.ready:
            model = self.model
            limits = self._infer_limits = InferLimits(max_batch=model.max_batch, image_shape=model.input_shape,
                                                      max_body_bytes=self.config.max_body_bytes)
        return limits

    def _infer_limit(self, headers: dict[str, str]) -> int:
        """The largest infer body this request may have, after decompression
        (:class:`~serving.protocol.InferLimits`; ``max_body_bytes`` until the model is loaded).
        Kept per header length: a binary client sends the same one every time."""
        hl = headers.get(HEADER_LENGTH)
        limit = self._limit_by_hl.get(hl)
        if limit is None:
            limits = self._infer_limits_now()
            if limits is None:
                return self.config.max_body_bytes
            limit = limits.limit(hl)
            if len(self._limit_by_hl) < 256:
                self._limit_by_hl[hl] = limit
        return limit

    def _infer_limit_why(self, headers: dict[str, str]) -> str:
        limits = self._infer_limits_now()
        return BODY_LIMIT_WHY if limits is None else limits.why(headers.get(HEADER_LENGTH))

    def _image_limit(self, headers: dict[str, str]) -> int:  # noqa: ARG002 - the signature of _infer_limit
        return self.config.max_image_bytes

    @staticmethod
    def _image_limit_why(headers: dict[str, str]) -> str:  # noqa: ARG004
        return "the image upload limit"

    async def _read_body(self, scope: Scope, receive: Receive, limits: BodyLimits) -> tuple[bytes, dict[str, str]]:
        """The whole body, decompressed, and the request headers.

        :param limits: the largest body in bytes for these headers, which bounds the body
            as announced, as received and as inflated (413), and where that limit comes
            from, naming the setting (for the 413 message).
        """
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = limits[0](headers)
        why_for = limits[1]
        raw = headers.get("content-length")
        if raw is not None:
            try:
                length = int(raw)
            except ValueError:
                raise InvalidInput(f"Content-Length {raw!r} is not an integer") from None
            if length > limit:
                raise PayloadTooLarge(f"request body is {length} bytes; this server accepts at most {limit} "
                                      f"({why_for(headers)})")
        elif "transfer-encoding" not in headers:
            raise LengthRequired("POST needs a Content-Length header (or a chunked body)")
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise ClientDisconnected
                    chunk = msg.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes ({why_for(headers)})")
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.config.body_timeout_s:.0f}s "
                                 f"({total} bytes received)") from None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if "content-encoding" in headers:
            try:
                body = decompress(body, headers["content-encoding"], limit)
            except PayloadTooLarge as exc:
                raise PayloadTooLarge(f"{exc.message} ({why_for(headers)})") from None
        return body, headers

    async def _admit(self, scope: Scope, receive: Receive, limits: BodyLimits,
                     prepare: Callable[[bytes, dict[str, str]], Awaitable[tuple[np.ndarray, Any]]]) -> tuple[Any, Any]:
        """Read the body, check readiness, ``prepare`` the pixels, run them through the batcher.

        The request is announced to the batcher while its body is read, so a
        forming batch can wait for it (see :mod:`serving.batching`).

        :returns: the :class:`~serving.batching.BatchResult` and what ``prepare`` returned beside the pixels.
        """
        self.batcher.expect()
        submitted = False
        try:
            body, headers = await self._read_body(scope, receive, limits)
            self.model._require_ready()
            t_pre = time.perf_counter()
            pixels, extra = await prepare(body, headers)
            self.metrics.stage("preprocess", time.perf_counter() - t_pre)
            submitted = True
            result = await self.batcher.submit(pixels, announced=True)
        finally:
            if not submitted:
                self.batcher.unexpect()
        self.metrics.stage("queue", result.queue_s)
        self.metrics.stage("inference", result.inference_s)
        return result, (pixels, extra)

    async def _infer(self, scope: Scope, receive: Receive) -> tuple[int, bytes, dict[str, str]]:
        model = self.model
        plans = self._plans

        async def prepare(body: bytes, headers: dict[str, str]) -> tuple[np.ndarray, InferPlan]:
            ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            hl = headers.get(HEADER_LENGTH)
            if hl is None and ctype not in ("application/json", "", "text/plain"):
                raise InvalidInput(f"Content-Type {ctype!r} needs the Inference-Header-Content-Length header "
                                   "(binary tensor data); send application/json otherwise")
            key = plans.key(body, hl) if hl is not None else None
            plan = plans.get(key) if key is not None else None
            if plan is not None:  # this JSON header was validated before: only the tensor bytes differ
                start = len(key[0])
                return np.frombuffer(body, np.uint8, count=len(body) - start, offset=start).reshape(plan.shape), plan
            request, binary = parse_request(body, hl)
            pixels, wanted = model.preprocess(request, binary)
            plan = InferPlan(pixels.shape, wanted, *binary_outputs(request), request.get("id"))
            if key is not None and binary:  # pixels sent as JSON data live in the header: nothing to reuse
                plans.put(key, plan)
            return pixels, plan

        result, (pixels, plan) = await self._admit(scope, receive, self._infer_limits_for, prepare)
        t_ser = time.perf_counter()
        outputs = model.select_outputs(result.outputs, plan.wanted, pixels.shape[0])
        out, out_headers = encode_planned(plan, model_name=model.name, model_version=model.version,
                                          outputs=outputs)
        self.metrics.stage("serialization", time.perf_counter() - t_ser)
        out_headers[TIMING_HEADER] = f"{result.inference_s * 1000:.3f}"
        self._log_sample(pixels, result.outputs, "infer")
        return 200, out, out_headers

    async def _classify(self, scope: Scope, receive: Receive) -> tuple[int, bytes, dict[str, str]]:
        model = self.model

        async def prepare(body: bytes, headers: dict[str, str]) -> tuple[np.ndarray, Any]:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype.startswith("multipart/"):
                raise UnsupportedMediaType(
                    "send the image file itself as the body, not a form: "
                    f"curl --data-binary @cat.png -H 'Content-Type: image/png' .../v2/models/{model.name}/classify")
            if ctype not in ("image/png", "image/jpeg", "application/octet-stream", ""):
                raise UnsupportedMediaType(f"Content-Type {ctype!r} is not supported; send image/png or image/jpeg")
            return await asyncio.get_running_loop().run_in_executor(None, self._decode, body)

        result, (pixels, orig) = await self._admit(scope, receive, self._image_limits_for, prepare)
        p = probabilities({k: v[:1] for k, v in result.outputs.items()})[0]
        best = int(result.outputs["logits"][0].argmax())
        answer = {
            "model_name": model.name, "model_version": model.version,
            "class": model.class_names[best], "index": best, "confidence": float(p[best]),
            "probabilities": {c: float(v) for c, v in zip(model.class_names, p, strict=True)},
            "input_size": {"height": orig[0], "width": orig[1], "channels": orig[2]},
        }
        self._log_sample(pixels, result.outputs, "classify")
        return 200, _json(answer), {**_JSON, TIMING_HEADER: f"{result.inference_s * 1000:.3f}"}

    def _decode(self, body: bytes) -> tuple[np.ndarray, tuple[int, int, int]]:
        from .images import decode_upload

        return decode_upload(body, self.model.input_shape)

    def _log_sample(self, pixels: np.ndarray, outputs: dict[str, np.ndarray], endpoint: str) -> None:
        rl = self.request_log
        if rl is None or not rl.sampled():
            return
        rl.submit(pixels, outputs, model_name=self.model.name, model_version=self.model.version,
                  class_names=self.model.class_names, endpoint=endpoint)


_JSON = {"content-type": "application/json"}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _routed(exc: InferenceError, route: str) -> InferenceError:
    exc.route = route  # type: ignore[attr-defined]
    return exc


__all__ = ["AppConfig", "ClientDisconnected", "InferenceApp", "InferenceFailed", "TIMING_HEADER"]
