"""Entry point of the inference server: configuration, logging, uvicorn.

Run ``python -m serving.server`` (in the image) or ``python server.py``.
One process, one event loop (uvicorn with httptools + uvloop, and on the same loop
the OIP gRPC service, :mod:`serving.grpc_service`), one batching
queue and one worker thread per model instance (by default one per container
CPU, each running ONNX Runtime on one intra-op thread: :func:`ort_layout`).
One process rather than several workers because dynamic batching needs every
request in one queue; ONNX Runtime's ``run`` is thread-safe, so the instances
share one session.
SIGTERM/SIGINT first hand clients over (``NIGHTSHIFT_DRAIN_S``): while
keep-alive connections are open, every answer says ``Connection: close`` and
``/v2/health/ready`` answers 503, so a client's next request opens a new
connection (through a blue/green proxy or a Service: to the new server)
instead of racing the close of an idle one ("connection reset by peer").
Then the server stops accepting connections, finishes in-flight requests (up
to ``NIGHTSHIFT_GRACEFUL_TIMEOUT_S``), flushes the request log and exits 0.
A second signal skips the hand-off.

Configuration (environment):

==================================  ====================================================  ==============
variable                            meaning                                               default
==================================  ====================================================  ==============
``NIGHTSHIFT_MODEL_DIR``            model directory (``model.onnx`` + ``model.json``)     ``/models/model``
``MODEL_URI``                       model-load variant: a directory, ``file://`` URI or    (unset)
                                    ``.tar.gz`` path/``http(s)://`` URL, read at start;
                                    overrides ``NIGHTSHIFT_MODEL_DIR``
``NIGHTSHIFT_HOST`` / ``_PORT``     bind address / port (``0`` picks one)                 127.0.0.1 / 8080
``NIGHTSHIFT_GRPC_PORT``            port of the OIP gRPC service on the same address;     off (image:
                                    ``0`` picks one; unset or ``off``: REST only          8081)
``NIGHTSHIFT_MAX_BATCH``            largest batch one request may carry                   256
``NIGHTSHIFT_MAX_BATCH_SIZE``       most images per ONNX Runtime call (dynamic batching)  32
``NIGHTSHIFT_MAX_QUEUE_DELAY_MS``   longest a batch waits for requests on their way       2
``NIGHTSHIFT_MAX_QUEUE_SIZE``       images that may wait; beyond: 503 + Retry-After       1024
``NIGHTSHIFT_MAX_QUEUE_WAIT_MS``    longest wait for a batch; beyond: 503 + Retry-After   1000
``NIGHTSHIFT_BATCH_SHARE``          1: with several instances a batch takes at most its   1
                                    share of the waiting images; 0: up to MAX_BATCH_SIZE
``NIGHTSHIFT_PLAN_CACHE_SIZE``      validated JSON headers of binary requests kept        256
                                    (:class:`~serving.protocol.InferPlan`); 0: none
``NIGHTSHIFT_MAX_BODY_BYTES``       largest request body (413 from Content-Length); an    64 MiB
                                    infer body, also after decompression, is capped
                                    lower at what ``MAX_BATCH`` images can need (below)
``NIGHTSHIFT_BODY_TIMEOUT_S``       time to receive a whole body (else 408)               30
``NIGHTSHIFT_ORT_THREADS``          ONNX Runtime intra-op threads per model instance      1
``NIGHTSHIFT_MODEL_INSTANCES``      batches run at once on the session (Triton's          CPUs / threads
                                    instance count)
``NIGHTSHIFT_LOG_LEVEL``            log level (JSON lines on stderr)                      WARNING
``NIGHTSHIFT_ACCESS_LOG_SAMPLE``    fraction of requests in the access log                0.01
``NIGHTSHIFT_REQUEST_LOG_DIR``      request-log directory (drift monitoring); unset: off  (unset)
``NIGHTSHIFT_REQUEST_LOG_SAMPLE``   fraction of requests written to the request log       0.1
``NIGHTSHIFT_REQUEST_LOG_ROTATE_S`` age at which a request-log file is published          60
``NIGHTSHIFT_REQUEST_LOG_*``        other request-log limits, see ``RequestLogConfig``
``NIGHTSHIFT_GRACEFUL_TIMEOUT_S``   drain time on SIGTERM                                 20
``NIGHTSHIFT_MAX_CONNECTIONS``      concurrent connections before uvicorn answers 503     2048
``NIGHTSHIFT_MAX_HEADERS``          header fields per request; beyond: 431                100
``NIGHTSHIFT_MAX_HEADER_BYTES``     request line + header fields of one request; beyond:  16384
                                    431
``NIGHTSHIFT_GIL_SWITCH_MS``         Python's thread switch interval (see below)           0.2
``NIGHTSHIFT_DRAIN_S``               keep-alive hand-off after SIGTERM (see below)         2
==================================  ====================================================  ==============

gRPC shares the REST API's model, batcher, metrics (``method="GRPC"``), request log,
readiness and limits: a message over ``MAX_BODY_BYTES`` is refused before it is parsed,
``MAX_CONNECTIONS`` bounds the RPCs handled at once, and on SIGTERM its readiness turns
false with REST's; once HTTP has drained, the gRPC server sends GOAWAY and lets in-flight
RPCs finish (up to ``GRACEFUL_TIMEOUT_S``) before the batcher stops. A gRPC port that
cannot be bound stops the server (exit status 2), like a taken HTTP port.

Request limits. An infer body is refused (413, naming the limit and the setting)
when it is larger than the model's largest batch can need, from its
``Content-Length``, while it arrives, or while it inflates (``Content-Encoding:
gzip|deflate``, inflated with a bounded ``max_length``, never whole first): as
binary tensor data, its JSON header and ``MAX_BATCH x H x W x C`` bytes; as JSON,
8 bytes per value plus 64 KiB (:class:`~serving.protocol.InferLimits`). JSON
nested more than 32 levels deep is a 400 before it is parsed
(:func:`~serving.protocol.json_too_deep`). The HTTP layer (uvicorn's httptools
protocol, :func:`limited_http_protocol`) answers 431 and closes the connection
when a request has more than ``MAX_HEADERS`` header fields or its request line
and header fields exceed ``MAX_HEADER_BYTES``, counted as they arrive.

The GIL switch interval: a model instance that finishes ``session.run`` needs
the GIL back to hand over its answers, and the event loop thread holds it
while it parses the next requests. Python makes a waiting thread wait up to
the switch interval (5 ms by default, four times this model's run time), so
under load an instance's core idled while the loop ran; 0.2 ms keeps the
instances fed (``docs/benchmarks.md``, "Serving under load").
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python server.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "serving"  # noqa: A001

from .app import TIMING_HEADER, AppConfig, InferenceApp  # noqa: E402
from .errors import *  # noqa: E402,F401,F403 - the public error types, for `from serving.server import ...`
from .errors import ModelLoadError  # noqa: E402
from .model import DEFAULT_MAX_BATCH, Model  # noqa: E402

log = logging.getLogger("nightshift.serving")

DEFAULT_MODEL_DIR = "/models/model"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: the OIP gRPC service's port in the image (KServe's default; ``ENV NIGHTSHIFT_GRPC_PORT`` in
#: include/inference/Dockerfile). Outside the image an unset NIGHTSHIFT_GRPC_PORT means REST only:
#: tests and benches start many servers on one host, and a fixed port would collide.
DEFAULT_GRPC_PORT = 8081
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_GIL_SWITCH_MS = 0.2
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_HEADER_BYTES = 16 << 10

__all__ = ["TIMING_HEADER", "InferenceServer", "Model", "ModelLoadError", "container_cpus", "main", "make_server"]


# --------------------------------------------------------------------------- environment


def container_cpus() -> int:
    """CPUs this process may use: the cgroup v2/v1 quota if any, else the affinity mask."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                n = min(n, max(1, -(-q // p)))
        except (OSError, ValueError):
            pass
    return max(1, n)


def _env(name: str, default: Any, kind: type = int) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"serving: environment variable {name}={raw!r} is not a {kind.__name__}") from None


def grpc_port_from_env() -> int | None:
    """``NIGHTSHIFT_GRPC_PORT``: a port (``0`` picks one), or ``None`` when unset or ``off`` (REST only;
    the image sets :data:`DEFAULT_GRPC_PORT`)."""
    raw = os.environ.get("NIGHTSHIFT_GRPC_PORT", "").strip().lower()
    if raw in ("", "off", "none", "no", "false"):
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise SystemExit(f"serving: NIGHTSHIFT_GRPC_PORT={raw!r} must be a port 0..65535 (0 picks one) or 'off'")
    return port


def _env_flag(name: str, default: bool) -> bool:
    value = _env(name, int(default))
    if value not in (0, 1):
        raise SystemExit(f"serving: environment variable {name}={value} must be 0 or 1")
    return bool(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` (+ ``fields``, ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "WARNING") -> None:
    """JSON lines on stderr at ``level``; the sampled access log always at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("nightshift.serving.access", "nightshift.serving.lifecycle"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


# --------------------------------------------------------------------------- model-load variant


def resolve_model_uri(uri: str, workdir: str | os.PathLike[str] | None = None) -> Path:
    """Turn ``MODEL_URI`` into a local model directory.

    Accepts a directory, ``file://`` URI of a directory, or a ``.tar.gz``
    (local path, ``file://`` or ``http(s)://``) whose top level, or single
    top-level folder, holds ``model.onnx`` and ``model.json``.

    :raises ModelLoadError: unsupported scheme, missing file, bad archive.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        path = Path(parts.path if scheme == "file" else uri)
        if path.is_dir():
            return path
        if not path.is_file():
            raise ModelLoadError(f"MODEL_URI {uri!r}: {path} does not exist")
        archive = path
    elif scheme in ("http", "https"):
        import urllib.request

        dest = Path(tempfile.mkdtemp(prefix="nightshift-model-", dir=workdir)) / "model.tar.gz"
        try:
            with urllib.request.urlopen(uri, timeout=60) as resp, open(dest, "wb") as f:  # noqa: S310
                shutil.copyfileobj(resp, f)
        except OSError as exc:
            raise ModelLoadError(f"MODEL_URI {uri!r}: download failed: {exc}") from exc
        archive = dest
    else:
        raise ModelLoadError(f"MODEL_URI {uri!r}: scheme {scheme!r} is not supported (use a path, file:// or http(s)://)")
    out = Path(tempfile.mkdtemp(prefix="nightshift-model-", dir=workdir))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ModelLoadError(f"MODEL_URI {uri!r}: not a readable tar archive: {exc}") from exc
    if not (out / "model.onnx").is_file():
        subdirs = [p for p in out.iterdir() if p.is_dir()]
        if len(subdirs) == 1 and (subdirs[0] / "model.onnx").is_file():
            return subdirs[0]
    return out


# --------------------------------------------------------------------------- running


def ort_layout(cpus: int, threads: int = 0, instances: int = 0) -> tuple[int, int]:
    """``(intra-op threads per instance, model instances)`` for ``cpus`` CPUs; 0 = choose.

    By default one intra-op thread per instance and one instance per CPU: a batch of
    one image of a small CNN does not get faster on more threads (ONNX Runtime's
    per-operator thread hand-offs cost more than they save, ``docs/benchmarks.md``),
    while concurrent batches on separate cores do scale. Set ``NIGHTSHIFT_ORT_THREADS``
    for a large model whose single requests must be fast; the instances then default
    to the CPUs left for them.
    """
    cpus = max(1, int(cpus))
    threads = int(threads) if threads and threads > 0 else 1
    instances = int(instances) if instances and instances > 0 else max(1, cpus // threads)
    return threads, instances


def _config_from_env(max_body_bytes: int | None = None, instances: int = 1) -> AppConfig:
    plan_cache_size = _env("NIGHTSHIFT_PLAN_CACHE_SIZE", 256)
    if plan_cache_size < 0:
        raise SystemExit("serving: NIGHTSHIFT_PLAN_CACHE_SIZE must be 0 (no cache) or more")
    return AppConfig(
        instances=instances,
        max_body_bytes=max_body_bytes or _env("NIGHTSHIFT_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        body_timeout_s=_env("NIGHTSHIFT_BODY_TIMEOUT_S", 30.0, float),
        max_batch_size=_env("NIGHTSHIFT_MAX_BATCH_SIZE", 32),
        max_queue_delay_ms=_env("NIGHTSHIFT_MAX_QUEUE_DELAY_MS", 2.0, float),
        max_queue_size=_env("NIGHTSHIFT_MAX_QUEUE_SIZE", 1024),
        max_queue_wait_ms=_env("NIGHTSHIFT_MAX_QUEUE_WAIT_MS", 1000.0, float),
        share_queue=_env_flag("NIGHTSHIFT_BATCH_SHARE", True),
        access_log_sample=_env("NIGHTSHIFT_ACCESS_LOG_SAMPLE", 0.01, float),
        plan_cache_size=plan_cache_size,
    )


@functools.cache
def limited_http_protocol(max_headers: int = DEFAULT_MAX_HEADERS,
                          max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> type:
    """uvicorn's httptools protocol with limits on a request's header fields (431).

    uvicorn's httptools protocol keeps every header field a client sends, and httptools
    buffers a field until its line ends: without limits, one request can hold any
    amount of memory and parser time before the app sees it. This subclass counts,
    per request, the header fields and the bytes of the request line and fields as
    the parser hands them over, and the bytes that arrive while a request's head is
    still incomplete (a field that never ends); past a limit it answers 431 with a
    JSON error and closes the connection. The count is a few integer operations per
    field on top of uvicorn's own callbacks.

    :param max_headers: most header fields per request (``NIGHTSHIFT_MAX_HEADERS``).
    :param max_header_bytes: most bytes of request line and header fields
        (``NIGHTSHIFT_MAX_HEADER_BYTES``); a head that is still incomplete may overrun it
        by one read from the socket before it is refused.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    if max_headers < 1 or max_header_bytes < 1:
        raise ValueError(f"header limits must be positive, got {max_headers} fields, {max_header_bytes} bytes")

    # the base methods, called directly (cheaper than super() on every request and field)
    base_data_received = HttpToolsProtocol.data_received
    base_on_message_begin = HttpToolsProtocol.on_message_begin
    base_on_url = HttpToolsProtocol.on_url
    base_on_header = HttpToolsProtocol.on_header
    base_on_headers_complete = HttpToolsProtocol.on_headers_complete
    too_large = (f"the request line and header fields exceed {max_header_bytes} bytes "
                 "(NIGHTSHIFT_MAX_HEADER_BYTES)")

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0  # request line and fields handed over by the parser
        _raw_head_bytes = 0  # bytes of reads that held only an unfinished head (not yet handed over)
        _in_head = False  # between a request's first byte and the end of its header fields
        _began = False  # a request began during the current data_received
        _refusal: str | None = None

        def data_received(self, data: bytes) -> None:
            self._began = False
            base_data_received(self, data)
            if self._in_head and not self._began and self._refusal is None:
                # the whole read belongs to a head that httptools is still buffering
                self._raw_head_bytes += len(data)
                if self._raw_head_bytes > max_header_bytes:
                    self._refusal = too_large
                    self.send_400_response(too_large)

        def on_message_begin(self) -> None:
            base_on_message_begin(self)
            self._head_bytes = self._raw_head_bytes = 0
            self._in_head = self._began = True

        def on_url(self, url: bytes) -> None:
            base_on_url(self, url)
            self._head_bytes += len(url)
            if self._head_bytes > max_header_bytes:
                self._refuse(f"the request line exceeds {max_header_bytes} bytes (NIGHTSHIFT_MAX_HEADER_BYTES)")

        def on_header(self, name: bytes, value: bytes) -> None:
            base_on_header(self, name, value)
            n = self._head_bytes = self._head_bytes + len(name) + len(value) + 4  # ": " and CRLF
            if n > max_header_bytes or len(self.headers) > max_headers:
                self._refuse(too_large if n > max_header_bytes else
                             f"the request has more than {max_headers} header fields (NIGHTSHIFT_MAX_HEADERS)")

        def on_headers_complete(self) -> None:
            self._in_head = False
            base_on_headers_complete(self)

        def _refuse(self, message: str) -> None:
            """Remember why; raising stops the parser, and uvicorn answers through
            :meth:`send_400_response`, which sends the 431."""
            self._refusal = message
            raise ValueError(message)

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                super().send_400_response(msg)
                return
            if self.transport.is_closing():
                return
            body = json.dumps({"error": self._refusal}).encode("utf-8")
            self.transport.write(b"".join([
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n",
                b"content-length: ", str(len(body)).encode("ascii"), b"\r\nconnection: close\r\n\r\n", body]))
            self.transport.close()

    return LimitedHttpToolsProtocol


def _uvicorn_config(app: InferenceApp, *, graceful_s: float = 20.0, max_connections: int = 2048,
                    max_headers: int = DEFAULT_MAX_HEADERS, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, loop="uvloop", http=limited_http_protocol(max_headers, max_header_bytes), lifespan="on",
        log_config=None, access_log=False,
        server_header=False, date_header=False, limit_concurrency=max_connections, backlog=2048,
        proxy_headers=False,  # no X-Forwarded-For rewriting per request: the access log shows the peer
        timeout_keep_alive=30, timeout_graceful_shutdown=int(graceful_s), ws="none",
    )


@functools.cache
def _draining_server_class() -> type:
    import uvicorn  # imported here: the module is importable without uvicorn (tests of its helpers)

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a keep-alive hand-off before its graceful shutdown (see the module doc)."""

        app: Any = None
        drain_s: float = 0.0
        _draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._draining or self.should_exit or self.drain_s <= 0 or not self.server_state.connections:
                super().handle_exit(sig, frame)
                return
            self._draining = True
            self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
            self.app.draining = True
            threading.Thread(target=self._hand_off, name="drain", daemon=True).start()

        def _hand_off(self) -> None:
            deadline = time.monotonic() + self.drain_s
            while self.server_state.connections and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

    return DrainingServer


class InferenceServer:
    """A bound uvicorn server for one :class:`InferenceApp`, runnable in a thread (tests, benchmarks).

    :param app: the ASGI app.
    :param host: bind address.
    :param port: 0 picks a free port (see :attr:`url`).
    :param grpc_port: serve the OIP gRPC service on ``host`` too, on this port (0 picks one,
        :attr:`grpc_target` has it once started); ``None``: REST only.
    :raises OSError: ``port`` or ``grpc_port`` cannot be bound.
    """

    def __init__(self, app: InferenceApp, host: str = DEFAULT_HOST, port: int = 0, *, drain_s: float = 0.0,
                 grpc_port: int | None = None, **uvicorn_kw: Any):
        self.app = app
        self.model = app.model
        self.grpc = None
        if grpc_port is not None:
            from .grpc_service import GrpcService, check_port_free

            check_port_free(host, grpc_port)
            self.grpc = GrpcService(app, host, grpc_port, max_concurrent_rpcs=uvicorn_kw.get("max_connections", 2048),
                                    grace_s=uvicorn_kw.get("graceful_s", 20.0))
            app.services.append(self.grpc)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.server_address = self.sock.getsockname()
        self.server = _draining_server_class()(_uvicorn_config(app, **uvicorn_kw))
        self.server.app, self.server.drain_s = app, float(drain_s)
        tasks = self.server.server_state.tasks
        grpc = self.grpc
        # requests in flight over both protocols: one alone runs inline, more are batched
        app.batcher.concurrent_requests = ((lambda: len(tasks)) if grpc is None else
                                           (lambda: len(tasks) + grpc.inflight))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def grpc_target(self) -> str | None:
        """``host:port`` of the gRPC service (once started, when port 0 was asked for), or ``None`` without one."""
        return self.grpc.target if self.grpc is not None else None

    def serve_forever(self, poll_interval: float = 0.1) -> None:  # noqa: ARG002 - http.server-compatible name
        """Serve until :meth:`shutdown` (blocking); return at once when the startup failed
        (``app.startup_error`` says why: uvicorn would ``sys.exit(3)`` instead)."""
        try:
            self.server.run(sockets=[self.sock])
        except SystemExit:
            if self.app.startup_error is None:
                raise

    def start(self, timeout_s: float = 10.0) -> "InferenceServer":
        """Serve in a daemon thread; return once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, drain in-flight requests, stop the batcher."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def server_close(self) -> None:
        self.sock.close()


def make_server(model: Model, host: str = DEFAULT_HOST, port: int = 0, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, config: AppConfig | None = None,
                request_log: Any = None, loader: Callable[[], Any] | None = None, grpc_port: int | None = None,
                **uvicorn_kw: Any) -> InferenceServer:
    """Bind a server for ``model`` (does not start serving; call ``start()`` or ``serve_forever()``).

    :func:`main` serves through it too, so embedding it (tests, benches) runs the server's own path.
    :param loader: loads the model in the background once serving starts (``main``); ``None``: the
        model is already loaded, or stays unready.
    :param grpc_port: also serve the OIP gRPC service on this port (0 picks one); ``None``: REST only.
    :param uvicorn_kw: :class:`InferenceServer`'s keyword arguments (``drain_s``, ``graceful_s`` ...).
    """
    cfg = config or AppConfig(max_body_bytes=max_body_bytes)
    return InferenceServer(InferenceApp(model, cfg, request_log=request_log, loader=loader), host, port,
                           grpc_port=grpc_port, **uvicorn_kw)


def main(argv: list[str] | None = None) -> int:
    """Bind, load the model in the background, serve until SIGTERM/SIGINT.

    ``/v2/health/live`` answers at once; ``/v2/health/ready`` turns 200 when
    the model is loaded. If loading fails the process exits 1 with the reason.

    :returns: the process exit status.
    """
    parser = argparse.ArgumentParser(description="Nightshift OIP (KServe v2) inference server")
    parser.add_argument("--model-dir", default=os.environ.get("NIGHTSHIFT_MODEL_DIR", DEFAULT_MODEL_DIR))
    parser.add_argument("--host", default=os.environ.get("NIGHTSHIFT_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=_env("NIGHTSHIFT_PORT", DEFAULT_PORT))
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="gRPC port (0 picks one, -1 none); default NIGHTSHIFT_GRPC_PORT, unset: REST only")
    args = parser.parse_args(argv)
    grpc_port = grpc_port_from_env() if args.grpc_port is None else (None if args.grpc_port < 0 else args.grpc_port)
    setup_logging(os.environ.get("NIGHTSHIFT_LOG_LEVEL", "WARNING"))
    switch_ms = _env("NIGHTSHIFT_GIL_SWITCH_MS", DEFAULT_GIL_SWITCH_MS, float)
    if not 0.01 <= switch_ms <= 100:
        raise SystemExit(f"serving: NIGHTSHIFT_GIL_SWITCH_MS={switch_ms} is outside 0.01..100")
    sys.setswitchinterval(switch_ms / 1000.0)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            log.warning("binding %s, which is not a loopback address: the model is reachable from outside", args.host)
    except ValueError:
        pass  # a host name

    for name in ("NIGHTSHIFT_MAX_HEADERS", "NIGHTSHIFT_MAX_HEADER_BYTES"):
        if _env(name, 1) < 1:
            raise SystemExit(f"serving: {name} must be at least 1")
    cpus = container_cpus()
    threads, instances = ort_layout(cpus, _env("NIGHTSHIFT_ORT_THREADS", 0), _env("NIGHTSHIFT_MODEL_INSTANCES", 0))
    model_uri = os.environ.get("MODEL_URI", "").strip()
    model = Model(args.model_dir if not model_uri else ".", name=None if not model_uri else "pending",
                  max_batch=_env("NIGHTSHIFT_MAX_BATCH", DEFAULT_MAX_BATCH), intra_op_threads=threads)

    def load() -> None:
        if model_uri:
            model_dir = resolve_model_uri(model_uri)
            fresh = Model(model_dir, max_batch=model.max_batch, intra_op_threads=threads)
            model.model_dir, model.name = fresh.model_dir, fresh.name
        model.load()

    request_log = None
    if os.environ.get("NIGHTSHIFT_REQUEST_LOG_DIR", "").strip():
        from .requestlog import RequestLog, RequestLogConfig

        try:
            log_config = RequestLogConfig.from_env()  # every NIGHTSHIFT_REQUEST_LOG_* setting, parsed once
        except ValueError as exc:
            raise SystemExit(f"serving: {exc}") from None
        try:
            request_log = RequestLog(config=log_config)
        except OSError as exc:
            log.error("request log directory %s is not writable: %s", log_config.directory, exc)
            return 2
    try:
        srv = make_server(model, args.host, args.port, config=_config_from_env(instances=instances),
                          request_log=request_log, loader=load, grpc_port=grpc_port,
                          graceful_s=_env("NIGHTSHIFT_GRACEFUL_TIMEOUT_S", 20.0, float),
                          max_connections=_env("NIGHTSHIFT_MAX_CONNECTIONS", 2048),
                          max_headers=_env("NIGHTSHIFT_MAX_HEADERS", DEFAULT_MAX_HEADERS),
                          max_header_bytes=_env("NIGHTSHIFT_MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES),
                          drain_s=_env("NIGHTSHIFT_DRAIN_S", 2.0, float))
    except OSError as exc:
        log.error("cannot bind %s:%s%s: %s (is another server on that port? set NIGHTSHIFT_PORT%s)",
                  args.host, args.port, "" if grpc_port is None else f" and gRPC port {grpc_port}", exc,
                  "" if grpc_port is None else " / NIGHTSHIFT_GRPC_PORT")
        return 2
    app = srv.app

    def failed(exc: BaseException) -> None:
        srv.server.should_exit = True

    app.on_load_failed = failed
    logging.getLogger("nightshift.serving.lifecycle").info("serving %s on %s (pid %d, %d CPU(s), %d model instance(s) x %d ORT thread(s), batch <= %d, queue <= %d)",
                model_uri or args.model_dir, srv.url, os.getpid(), cpus, instances, threads, app.config.max_batch_size,
                app.config.max_queue_size)
    # uvicorn handles SIGTERM/SIGINT (drain, then stop) and re-raises the signal once it
    # is done; these handlers receive that re-raise, so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    srv.serve_forever()
    srv.server_close()
    if app.startup_error is not None:
        log.error("the server did not start: %s", app.startup_error)
        return 2
    if app.load_failed is not None:
        return 1
    logging.getLogger("nightshift.serving.lifecycle").info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

