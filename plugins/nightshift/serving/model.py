"""Open Inference Protocol (KServe v2, JSON/REST) server for one ONNX model.

Only the standard library, :mod:`numpy` and :mod:`onnxruntime` are used: this
file is copied into the inference image and must run there without the rest of
Nightshift.

The served model directory holds ``model.onnx`` and ``model.json`` (see
``docs/architecture.md``). The model takes ``uint8`` NHWC pixels and returns
``logits`` and ``embedding`` (``float32``); the server adds ``label``
(``BYTES``), the class name of each row's arg-max.

Endpoints::

    GET  /v2                               server metadata
    GET  /v2/health/live                   200 while the process runs
    GET  /v2/health/ready                  200 once the model is loaded, else 503
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    200 / 503
    POST /v2/models/{name}[/versions/{v}]/infer    inference

Errors are JSON ``{"error": "..."}``: 400 bad input, 404 unknown model or
route, 405 wrong method, 411 missing ``Content-Length``, 413 body or batch too
large, 500 inference failed, 503 model not ready.

Configuration (environment):

``NIGHTSHIFT_MODEL_DIR``       model directory (default ``/models/model``)
``NIGHTSHIFT_HOST``            bind address (default ``127.0.0.1``)
``NIGHTSHIFT_PORT``            port (default ``8080``; ``0`` picks a free one)
``NIGHTSHIFT_MAX_BATCH``       largest accepted batch (default ``256``)
``NIGHTSHIFT_MAX_BODY_BYTES``  largest accepted request body (default 64 MiB)
``NIGHTSHIFT_ORT_THREADS``     ONNX Runtime intra-op threads (default: ORT's choice)
``NIGHTSHIFT_LOG_LEVEL``       ``INFO`` (one line per request) or ``WARNING``

Run with ``python -m serving.server`` or ``python server.py``. SIGTERM and
SIGINT stop accepting connections, finish in-flight requests and exit 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

__version__ = "0.1.0"

log = logging.getLogger("nightshift.serving")

DEFAULT_MODEL_DIR = "/models/model"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Response header carrying the model's run time for one request, in milliseconds.
TIMING_HEADER = "X-Inference-Time-Ms"

# ONNX tensor element type -> (OIP datatype, numpy dtype)
_ONNX_TYPES: dict[str, tuple[str, Any]] = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(bool)": ("BOOL", np.bool_),
}


# --------------------------------------------------------------------------- errors


class InferenceError(Exception):
    """Base class of errors that become an HTTP answer ``{"error": message}``.

    :param message: what went wrong, written for the client.
    """

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class InvalidInput(InferenceError):
    """The request is malformed or does not match the model's input (400)."""

    status = HTTPStatus.BAD_REQUEST


class ModelNotFound(InferenceError):
    """The request names a model (or version) this server does not serve (404)."""

    status = HTTPStatus.NOT_FOUND


class RouteNotFound(InferenceError):
    """No endpoint at this path (404)."""

    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(InferenceError):
    """The path exists but not for this HTTP method (405).

    :param allowed: the methods the path accepts, for the ``Allow`` header.
    """

    status = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allowed: str):
        self.allowed = allowed
        super().__init__(message)


class LengthRequired(InferenceError):
    """A POST came without ``Content-Length`` (411)."""

    status = HTTPStatus.LENGTH_REQUIRED


class PayloadTooLarge(InferenceError):
    """The body or the batch is larger than this server accepts (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotReady(InferenceError):
    """The model has not been loaded (yet), or loading it failed (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class InferenceFailed(InferenceError):
    """ONNX Runtime raised, or produced an unusable result (500)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelLoadError(Exception):
    """The model directory is missing, incomplete or inconsistent."""


# --------------------------------------------------------------------------- model


class Model:
    """One ONNX classifier, KServe style: a cheap constructor and a ``load()``.

    :param model_dir: directory holding ``model.onnx`` and ``model.json``.
    :param name: the name the model is served under; default ``model.json``'s
        ``name``, else the directory's name. Reading ``model.json`` for the
        name is the only I/O the constructor does.
    :param max_batch: the largest batch a request may carry.
    :param intra_op_threads: ONNX Runtime intra-op threads; ``None`` lets ORT choose.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        name: str | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        intra_op_threads: int | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.intra_op_threads = intra_op_threads
        if name is None:
            try:
                name = str(json.loads((self.model_dir / "model.json").read_text("utf-8"))["name"])
            except Exception:  # noqa: BLE001 - load() reports the real problem
                name = self.model_dir.name
        self.name: str = name
        self.version: str = ""
        self.ready: bool = False
        self.load_error: str | None = None
        self.meta: dict[str, Any] = {}
        self.class_names: list[str] = []
        self.input_name: str = ""
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.output_names: list[str] = []
        self.output_types: dict[str, tuple[str, Any]] = {}
        self.output_dims: dict[str, list[Any]] = {}
        self._session: Any = None

    # -- loading -------------------------------------------------------------------

    def load(self) -> bool:
        """Read ``model.json``, create the ONNX Runtime session and check they agree.

        :returns: ``True`` (the model is ready).
        :raises ModelLoadError: a file is missing or ``model.json`` disagrees
            with the ONNX graph; the message names the file and the field.
        """
        try:
            self._load()
        except ModelLoadError as exc:
            self.load_error = str(exc)
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(f"could not load model from {self.model_dir}: {self.load_error}") from exc
        self.load_error = None
        self.ready = True
        return True

    def _load(self) -> None:
        import onnxruntime as ort  # heavy; imported when the model is loaded

        meta_path = self.model_dir / "model.json"
        onnx_path = self.model_dir / "model.onnx"
        for p in (meta_path, onnx_path):
            if not p.is_file():
                raise ModelLoadError(
                    f"{p} does not exist; NIGHTSHIFT_MODEL_DIR must point to a directory with "
                    f"model.onnx and model.json (it is {self.model_dir})"
                )
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")

        class_names = meta.get("class_names")
        if not isinstance(class_names, list) or not class_names:
            raise ModelLoadError(f"{meta_path}: 'class_names' must be a non-empty list, got {class_names!r}")
        shape = meta.get("input_shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ModelLoadError(f"{meta_path}: 'input_shape' must be [H, W, C] positive integers, got {shape!r}")
        datatype = meta.get("input_datatype", "UINT8")
        if datatype != "UINT8":
            raise ModelLoadError(f"{meta_path}: 'input_datatype' must be 'UINT8', got {datatype!r}")

        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{onnx_path} must have exactly one input, it has {[i.name for i in inputs]}")
        onnx_in = inputs[0]
        input_name = meta.get("input_name", onnx_in.name)
        if onnx_in.name != input_name:
            raise ModelLoadError(
                f"{meta_path}: input_name {input_name!r} does not match the ONNX graph's input {onnx_in.name!r}"
            )
        if onnx_in.type != "tensor(uint8)":
            raise ModelLoadError(f"{onnx_path}: input {onnx_in.name!r} has type {onnx_in.type}, expected tensor(uint8)")
        dims = list(onnx_in.shape)
        if len(dims) != 4:
            raise ModelLoadError(f"{onnx_path}: input {onnx_in.name!r} has shape {dims}, expected [batch, H, W, C]")
        for axis, (got, want) in enumerate(zip(dims[1:], shape, strict=True), start=1):
            if isinstance(got, int) and got != want:
                raise ModelLoadError(
                    f"{meta_path}: input_shape {shape} disagrees with the ONNX input shape {dims} (axis {axis})"
                )

        output_names = [o.name for o in session.get_outputs()]
        if "logits" not in output_names:
            raise ModelLoadError(f"{onnx_path} has no output named 'logits' (outputs: {output_names})")
        output_types: dict[str, tuple[str, Any]] = {}
        for o in session.get_outputs():
            if o.type not in _ONNX_TYPES:
                raise ModelLoadError(f"{onnx_path}: output {o.name!r} has unsupported type {o.type}")
            output_types[o.name] = _ONNX_TYPES[o.type]
        logits_dims = next(o.shape for o in session.get_outputs() if o.name == "logits")
        if len(logits_dims) == 2 and isinstance(logits_dims[1], int) and logits_dims[1] != len(class_names):
            raise ModelLoadError(
                f"{meta_path} lists {len(class_names)} class_names but the model's logits have "
                f"{logits_dims[1]} columns"
            )

        self.meta = meta
        self.version = str(meta.get("version", ""))
        self.class_names = [str(c) for c in class_names]
        self.input_name = onnx_in.name
        self.input_shape = (shape[0], shape[1], shape[2])
        self.output_names = output_names
        self.output_types = output_types
        self.output_dims = {o.name: list(o.shape) for o in session.get_outputs()}
        self._session = session
        log.info(
            "loaded model %r version %r from %s: input %s uint8 [n,%d,%d,%d], outputs %s, %d classes",
            self.name, self.version, self.model_dir, self.input_name, *self.input_shape,
            output_names, len(self.class_names),
        )

    # -- metadata ------------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.ready:
            why = f": {self.load_error}" if self.load_error else " (still loading)"
            raise ModelNotReady(f"model {self.name!r} is not ready{why}")

    def metadata(self) -> dict[str, Any]:
        """The OIP model-metadata answer.

        :raises ModelNotReady: the model is not loaded.
        """
        self._require_ready()
        outputs = [
            {"name": n, "datatype": self.output_types[n][0], "shape": [-1, *self._static(self.output_dims[n][1:])]}
            for n in self.output_names
        ]
        outputs.append({"name": "label", "datatype": "BYTES", "shape": [-1]})
        return {
            "name": self.name,
            "versions": [self.version] if self.version else [],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.input_name, "datatype": "UINT8", "shape": [-1, *self.input_shape]}],
            "outputs": outputs,
            "parameters": {"class_names": self.class_names, "max_batch": self.max_batch},
        }

    @staticmethod
    def _static(dims: list[Any]) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in dims]

    # -- inference -----------------------------------------------------------------

    def preprocess(self, request: Any) -> tuple[np.ndarray, list[str]]:
        """Validate an OIP infer request and turn it into the input array.

        :param request: the decoded JSON body.
        :returns: the ``uint8`` NHWC batch and the names of the outputs to return.
        :raises InvalidInput: anything about the request is wrong; the message
            names the field and what was expected.
        :raises PayloadTooLarge: the batch is larger than ``max_batch``.
        """
        if not isinstance(request, dict):
            raise InvalidInput(f"request body must be a JSON object, got {type(request).__name__}")
        inputs = request.get("inputs")
        if inputs is None:
            raise InvalidInput("request has no 'inputs'; expected "
                               f"{{\"inputs\": [{{\"name\": \"{self.input_name}\", ...}}]}}")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("'inputs' must be a non-empty list of tensors")
        if len(inputs) != 1:
            raise InvalidInput(f"'inputs' must hold exactly one tensor ({self.input_name!r}), got {len(inputs)}")
        tensor = inputs[0]
        if not isinstance(tensor, dict):
            raise InvalidInput(f"inputs[0] must be a JSON object, got {type(tensor).__name__}")
        name = tensor.get("name")
        if name != self.input_name:
            raise InvalidInput(f"inputs[0].name is {name!r}; this model's input is named {self.input_name!r}")
        datatype = tensor.get("datatype")
        if datatype != "UINT8":
            raise InvalidInput(f"inputs[0].datatype is {datatype!r}; input {self.input_name!r} must be 'UINT8'")

        h, w, c = self.input_shape
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise InvalidInput(f"inputs[0].shape must be a list of integers [n, {h}, {w}, {c}], got {shape!r}")
        if len(shape) != 4 or shape[1:] != [h, w, c]:
            raise InvalidInput(f"inputs[0].shape is {shape}; expected [n, {h}, {w}, {c}] (NHWC, n = batch size)")
        n = shape[0]
        if n < 1:
            raise InvalidInput(f"inputs[0].shape has batch size {n}; it must be at least 1")
        if n > self.max_batch:
            raise PayloadTooLarge(
                f"batch size {n} exceeds this server's maximum of {self.max_batch}; split the request"
            )

        data = tensor.get("data")
        if not isinstance(data, list):
            raise InvalidInput(f"inputs[0].data must be a list of integers 0..255, got {type(data).__name__}")
        expected = n * h * w * c
        if data and isinstance(data[0], list):  # nested form: flatten it
            try:
                arr = np.asarray(data)
            except ValueError as exc:
                raise InvalidInput(f"inputs[0].data is a ragged nested list: {exc}") from exc
            arr = arr.reshape(-1) if arr.dtype != object else arr
        else:
            arr = np.asarray(data)
        if arr.dtype == object or arr.ndim != 1:
            raise InvalidInput("inputs[0].data must be a flat (or regularly nested) list of integers 0..255")
        if arr.size != expected:
            raise InvalidInput(
                f"inputs[0].data has {arr.size} values but shape {shape} needs {expected} "
                f"(= {' x '.join(map(str, shape))})"
            )
        if arr.dtype.kind not in "iu":
            kind = {"b": "booleans", "f": "non-integer numbers", "U": "strings"}.get(arr.dtype.kind, str(arr.dtype))
            raise InvalidInput(f"inputs[0].data holds {kind}; UINT8 data must be integers 0..255")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            bad = int(np.flatnonzero((arr < 0) | (arr > 255))[0])
            raise InvalidInput(
                f"inputs[0].data[{bad}] = {int(arr[bad])} is outside 0..255 (UINT8); values range {lo}..{hi}"
            )

        wanted = self._requested_outputs(request.get("outputs"))
        return arr.astype(np.uint8).reshape(n, h, w, c), wanted

    def _requested_outputs(self, outputs: Any) -> list[str]:
        available = [*self.output_names, "label"]
        if outputs is None:
            return available
        if not isinstance(outputs, list) or not outputs:
            raise InvalidInput("'outputs' must be a non-empty list of {\"name\": ...} objects")
        names: list[str] = []
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInput(f"outputs[{i}] must be an object with a string 'name', got {o!r}")
            if o["name"] not in available:
                raise InvalidInput(
                    f"outputs[{i}].name {o['name']!r} is not an output of this model; choose from {available}"
                )
            if o["name"] not in names:
                names.append(o["name"])
        return names

    def predict(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run the ONNX session.

        :param pixels: ``uint8`` array ``(n, H, W, C)``.
        :returns: output name -> array, for every output of the graph.
        :raises ModelNotReady: the model is not loaded.
        :raises InferenceFailed: ONNX Runtime raised.
        """
        self._require_ready()
        try:
            results = self._session.run(None, {self.input_name: pixels})
        except Exception as exc:  # noqa: BLE001 - any runtime failure is a 500
            raise InferenceFailed(f"ONNX Runtime failed on a batch of shape {list(pixels.shape)}: {exc}") from exc
        return dict(zip(self.output_names, results, strict=True))

    def postprocess(self, outputs: dict[str, np.ndarray], wanted: list[str], n: int) -> list[dict[str, Any]]:
        """Turn model outputs into OIP output tensors (adds ``label``).

        :raises InferenceFailed: an output has the wrong batch size or holds NaN/inf.
        """
        result: list[dict[str, Any]] = []
        logits = outputs["logits"]
        if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] != len(self.class_names):
            raise InferenceFailed(
                f"model returned logits of shape {list(logits.shape)}, expected [{n}, {len(self.class_names)}]"
            )
        for name in wanted:
            if name == "label":
                idx = np.argmax(logits, axis=1)
                result.append({"name": "label", "shape": [n], "datatype": "BYTES",
                               "data": [self.class_names[int(i)] for i in idx]})
                continue
            arr = outputs[name]
            if arr.ndim < 1 or arr.shape[0] != n:
                raise InferenceFailed(f"model output {name!r} has shape {list(arr.shape)}, expected batch size {n}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InferenceFailed(f"model output {name!r} contains NaN or infinity")
            result.append({"name": name, "shape": list(arr.shape), "datatype": self.output_types[name][0],
                           "data": arr.reshape(-1).tolist()})
        return result

    def infer(self, request: Any) -> dict[str, Any]:
        """Answer one OIP infer request (validate, run, format).

        :param request: the decoded JSON body.
        :returns: the OIP response object.
        """
        self._require_ready()
        pixels, wanted = self.preprocess(request)
        outputs = self.predict(pixels)
        response: dict[str, Any] = {
            "model_name": self.name,
            "model_version": self.version,
            "outputs": self.postprocess(outputs, wanted, pixels.shape[0]),
        }
        if isinstance(request.get("id"), str):
            response["id"] = request["id"]
        return response


# --------------------------------------------------------------------------- HTTP

_MODEL_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")


class InferenceHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves one :class:`Model`.

    :param address: ``(host, port)``; port 0 picks a free port.
    :param model: the model to serve (loaded or not; readiness follows it).
    :param max_body_bytes: larger request bodies are refused with 413.
    """

    daemon_threads = True  # idle keep-alive connections must not block shutdown
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: Model, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.model = model
        self.max_body_bytes = int(max_body_bytes)
        self._active = 0
        self._active_cond = threading.Condition()
        super().__init__(address, InferenceHandler)

    def request_started(self) -> None:
        """Count a request in flight (see :meth:`wait_idle`)."""
        with self._active_cond:
            self._active += 1

    def request_finished(self) -> None:
        """Count a request as answered."""
        with self._active_cond:
            self._active -= 1
            self._active_cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is being handled.

        :returns: ``False`` if requests were still in flight after ``timeout_s``.
        """
        with self._active_cond:
            return self._active_cond.wait_for(lambda: self._active == 0, timeout=timeout_s)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class InferenceHandler(BaseHTTPRequestHandler):
    """Routes OIP requests to the server's :class:`Model`; answers JSON."""

    server: InferenceHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    server_version = f"nightshift-serving/{__version__}"
    timeout = 60  # seconds a client may stall while sending (socket timeout)
    # Headers and body are separate writes; with Nagle's algorithm the body waits for
    # the client's delayed ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True

    # -- plumbing ------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # noqa: D102
        pass  # one line per request is written by _handle, with the duration

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.warning("%s %s", self.client_address[0], format % args)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise LengthRequired("chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise LengthRequired("POST needs a Content-Length header")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise InvalidInput(f"Content-Length {raw!r} is not a non-negative integer") from None
        if length > self.server.max_body_bytes:
            self.close_connection = True  # the unread body would poison the connection
            raise PayloadTooLarge(
                f"request body is {length} bytes; this server accepts at most {self.server.max_body_bytes} "
                "(send smaller batches)"
            )
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) != length:
            self.close_connection = True
            raise InvalidInput(f"request body ended after {len(body)} of {length} bytes (Content-Length)")
        return body

    def _discard_body(self) -> None:
        """Consume a body nobody read (error before the handler got to it), so the
        next request on this keep-alive connection starts where it should; if
        that is not possible, close the connection after answering."""
        if self._body_read or self.close_connection:
            return
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return
        raw = self.headers.get("Content-Length")
        if raw is None:
            return
        try:
            remaining = int(raw)
        except ValueError:
            self.close_connection = True
            return
        if remaining < 0 or remaining > self.server.max_body_bytes:
            self.close_connection = True
            return
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    self.close_connection = True
                    return
                remaining -= len(chunk)
        except OSError:  # the client stalled or went away
            self.close_connection = True

    # -- routing -------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        start = time.perf_counter()
        self._status = 0
        self._body_read = False
        extra = ""
        self.server.request_started()
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            status, obj, headers = self._dispatch(method, path)
            extra = f"model={headers[TIMING_HEADER]}ms" if TIMING_HEADER in headers else ""
            self._discard_body()
            self._send_json(status, obj, headers)
        except InferenceError as exc:
            headers = {"Allow": exc.allowed} if isinstance(exc, MethodNotAllowed) else {}
            self._discard_body()
            self._safe_error(int(exc.status), exc.message, headers)
            extra = exc.message
        except Exception as exc:  # noqa: BLE001 - never let a bug kill the connection silently
            log.exception("unhandled error on %s %s", method, self.path)
            self.close_connection = True
            self._safe_error(500, f"internal server error: {type(exc).__name__}: {exc}", {})
            extra = f"{type(exc).__name__}: {exc}"
        finally:
            self.server.request_finished()
            ms = (time.perf_counter() - start) * 1000.0
            log.info('%s "%s %s" %s %.1fms %s', self.client_address[0], method, self.path,
                     self._status or "-", ms, extra[:200])

    def _safe_error(self, status: int, message: str, headers: dict[str, str]) -> None:
        try:
            self._send_json(status, {"error": message}, headers)
        except OSError:
            self.close_connection = True

    def _dispatch(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        model = self.server.model
        reading = method in ("GET", "HEAD")
        if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            if not reading:
                raise MethodNotAllowed(f"{path} accepts GET, not {method}", "GET, HEAD")
            if path == "/v2/health/live":
                return 200, {"live": True}, {}
            if path == "/v2":
                return 200, {"name": "nightshift-serving", "version": __version__, "extensions": []}, {}
            if not model.ready:
                why = model.load_error or "model is still loading"
                return 503, {"ready": False, "error": f"model {model.name!r} is not ready: {why}"}, {}
            return 200, {"ready": True}, {}

        m = _MODEL_ROUTE.match(path)
        if m is None:
            raise RouteNotFound(
                f"no endpoint at {path!r}; try /v2/health/ready or POST /v2/models/{model.name}/infer"
            )
        name, version, rest = unquote(m["name"]), m["version"], m["rest"] or ""
        if name != model.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {model.name!r}")
        if version is not None and model.ready and unquote(version) != model.version:
            raise ModelNotFound(
                f"model {name!r} has no version {unquote(version)!r}; the served version is {model.version!r}"
            )
        if rest == "/infer":
            if method != "POST":
                raise MethodNotAllowed(f"{path} accepts POST, not {method}", "POST")
            return self._infer(model)
        if not reading:
            raise MethodNotAllowed(f"{path} accepts GET, not {method}", "GET, HEAD")
        if rest == "/ready":
            if not model.ready:
                why = model.load_error or "model is still loading"
                return 503, {"name": name, "ready": False, "error": f"model {name!r} is not ready: {why}"}, {}
            return 200, {"name": name, "ready": True}, {}
        return 200, model.metadata(), {}

    def _infer(self, model: Model) -> tuple[int, Any, dict[str, str]]:
        body = self._read_body()  # read before anything else so keep-alive stays in sync
        model._require_ready()
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "", "text/plain"):
            raise InvalidInput(f"Content-Type {ctype!r} is not supported; send application/json")
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"request body is not UTF-8 text: {exc}") from exc
        except ValueError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
        t0 = time.perf_counter()
        response = model.infer(request)
        ms = (time.perf_counter() - t0) * 1000.0
        return 200, response, {TIMING_HEADER: f"{ms:.3f}"}


# --------------------------------------------------------------------------- entry point


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"serving: environment variable {name}={raw!r} is not an integer") from None


def make_server(
    model: Model,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> InferenceHTTPServer:
    """Bind an :class:`InferenceHTTPServer` for ``model`` (does not start serving).

    :param port: 0 picks a free port; read it back from ``server.server_address``.
    """
    return InferenceHTTPServer((host, port), model, max_body_bytes=max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve until SIGTERM/SIGINT.

    The port is bound first and the model loaded in the background, so
    ``/v2/health/live`` answers at once and ``/v2/health/ready`` turns 200 when
    loading is done. If loading fails the process exits 1 with the reason.

    :returns: the process exit status.
    """
    parser = argparse.ArgumentParser(description="Nightshift OIP (KServe v2) inference server")
    parser.add_argument("--model-dir", default=os.environ.get("NIGHTSHIFT_MODEL_DIR", DEFAULT_MODEL_DIR))
    parser.add_argument("--host", default=os.environ.get("NIGHTSHIFT_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=_env_int("NIGHTSHIFT_PORT", DEFAULT_PORT))
    args = parser.parse_args(argv)

    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("NIGHTSHIFT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            log.warning("binding %s, which is not a loopback address: the model is reachable from outside", args.host)
    except ValueError:
        pass  # a host name; nothing to check

    model = Model(
        args.model_dir,
        max_batch=_env_int("NIGHTSHIFT_MAX_BATCH", DEFAULT_MAX_BATCH),
        intra_op_threads=_env_int("NIGHTSHIFT_ORT_THREADS", 0) or None,
    )
    try:
        server = make_server(model, args.host, args.port,
                             max_body_bytes=_env_int("NIGHTSHIFT_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
    except OSError as exc:
        log.error("cannot bind %s:%s: %s (is another server on that port? set NIGHTSHIFT_PORT)",
                  args.host, args.port, exc)
        return 2

    failed = threading.Event()

    def stop(signum: int | None = None, _frame: Any = None) -> None:
        if signum is not None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever to return, so never call it on the serving thread
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    def load() -> None:
        try:
            model.load()
        except Exception as exc:  # noqa: BLE001
            log.error("model failed to load: %s", exc)
            failed.set()
            stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving model %r from %s on %s (pid %d)", model.name, model.model_dir, server.url, os.getpid())
    threading.Thread(target=load, name="model-load", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if not server.wait_idle(timeout_s=5.0):
            log.warning("requests still in flight after 5s; exiting anyway")
        server.server_close()
    log.info("server stopped")
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
