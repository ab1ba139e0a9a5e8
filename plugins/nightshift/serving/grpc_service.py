"""The Open Inference Protocol's gRPC service (``grpc_predict_v2.proto``) beside the REST API.

Standard library, numpy, ``grpcio`` and ``protobuf`` only (copied into the inference image
with its generated stubs, ``grpc_predict_v2_pb2*.py``; see ``scripts/gen_grpc_stubs.py``).

One server, two protocols: :class:`GrpcService` runs ``grpc.aio`` on the event loop uvicorn
runs (uvloop), started and stopped by :class:`~serving.app.InferenceApp`'s lifespan, and
answers through the *same* app: the same model and readiness (also while draining), the
same dynamic batcher (a gRPC request and an HTTP request can share a batch), the same
metrics (route names as over HTTP, ``method="GRPC"``, ``code`` the HTTP status the same
outcome gets over REST, so one error-rate query covers both) and the same request log
(``endpoint`` ``infer``, the fields ``drift_monitor`` reads). Because everything runs on the
loop's thread, the loop-only parts (the lock-free histograms, the request log's sampling)
need no lock; ``docs/serving.md`` ("gRPC") has the measured cost against a thread of its own.

Methods: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``,
``ModelMetadata``, ``ModelInfer`` (``tritonclient.grpc`` and KServe's gRPC client work
unchanged). ``ModelInfer`` takes the input as ``raw_input_contents`` (raw bytes; the
answer then carries ``raw_output_contents``, as Triton's does) or as typed contents
(``inputs[0].contents.uint_contents``; the answer then carries typed contents too,
as KServe's does, except for a datatype without a typed field, such as FP16).

Bad input never crashes the server; it gets a status code and a message naming the field:

=====================  ====================================================  ===========
gRPC status            when                                                  HTTP twin
=====================  ====================================================  ===========
``INVALID_ARGUMENT``   wrong input name, datatype, shape or data size,       400 / 413
                       missing inputs, unknown output, batch over
                       ``NIGHTSHIFT_MAX_BATCH``
``NOT_FOUND``          unknown model or version                              404
``UNAVAILABLE``        model not loaded (yet), queue full, shutting down     503
``RESOURCE_EXHAUSTED`` message over ``NIGHTSHIFT_MAX_BODY_BYTES`` (gRPC's     413
                       own check, before parsing), or more than
                       ``NIGHTSHIFT_MAX_CONNECTIONS`` RPCs at once
``INTERNAL``           ONNX Runtime failed, or a bug (logged)                500
``UNIMPLEMENTED``      a method of Triton's service this server lacks        --
                       (model config, statistics, repository, streaming)
=====================  ====================================================  ===========
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from . import __version__
from . import grpc_predict_v2_pb2 as pb
from . import grpc_predict_v2_pb2_grpc as pb_grpc
from .errors import InferenceError, InvalidInput, ModelNotFound
from .protocol import EXTENSIONS, _tensor_bytes

if TYPE_CHECKING:
    from .app import InferenceApp

log = logging.getLogger("nightshift.serving")
access_log = logging.getLogger("nightshift.serving.access")

#: The full method name prefix of the service (what the access log shows as the path).
SERVICE = "/inference.GRPCInferenceService/"

#: HTTP status of an :class:`~serving.errors.InferenceError` -> the gRPC status it gets.
_STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # a batch over NIGHTSHIFT_MAX_BATCH: Triton says INVALID_ARGUMENT too
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}

#: OIP datatype -> the ``InferTensorContents`` field that carries it (no FP16 / BF16 field)
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def grpc_status(exc: InferenceError) -> grpc.StatusCode:
    """The gRPC status code of a serving error (its HTTP twin's meaning, see the module doc)."""
    return _STATUS_CODES.get(int(exc.status), grpc.StatusCode.INTERNAL)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Fail now, with the OS's reason, when ``host:port`` cannot be bound (``OSError``).

    The gRPC server binds only once the event loop runs (inside uvicorn's startup); this
    early probe lets :func:`serving.server.main` report a taken port the way it reports the
    HTTP port's (exit status 2, naming the setting) before anything starts. Port 0 always passes.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


class GrpcService:
    """The gRPC server of one :class:`~serving.app.InferenceApp`, on the app's event loop.

    Register it in ``app.services`` (:func:`serving.server.make_server` does, given a
    ``grpc_port``): the app's lifespan calls :meth:`start` after the batcher started and
    :meth:`stop` before the batcher stops.

    :param app: the app whose model, batcher, metrics and request log it shares.
    :param host: bind address.
    :param port: 0 picks a free port (:attr:`port` has it once started); the image's default is
        8081 (``NIGHTSHIFT_GRPC_PORT``, :mod:`serving.server`).
    :param max_concurrent_rpcs: RPCs handled at once; more get ``RESOURCE_EXHAUSTED``.
    :param grace_s: on stop, how long in-flight RPCs may still finish.
    """

    def __init__(self, app: "InferenceApp", host: str, port: int, *,
                 max_concurrent_rpcs: int = 2048, grace_s: float = 20.0):
        if not 0 <= int(port) < 65536:
            raise ValueError(f"gRPC port must be 0..65535, got {port}")
        self.app = app
        self.host = host
        self.port = int(port)
        self.max_concurrent_rpcs = int(max_concurrent_rpcs)
        self.grace_s = float(grace_s)
        #: ModelInfer calls being handled now (the batcher's concurrency probe adds them)
        self.inflight = 0
        self._server: Any = None
        self._metadata: pb.ModelMetadataResponse | None = None

    @property
    def target(self) -> str:
        """``host:port`` for a client channel (``tritonclient.grpc.InferenceServerClient(url=...)``)."""
        return _address(self.host, self.port)

    async def start(self) -> None:
        """Bind and start serving (on the running loop).

        :raises OSError: the address cannot be bound (another server on the port?).
        """
        options = [
            # a second server on the same port must fail to start, not share the port's traffic
            ("grpc.so_reuseport", 0),
            # the same cap as an HTTP body; gRPC answers RESOURCE_EXHAUSTED before parsing
            ("grpc.max_receive_message_length", int(self.app.config.max_body_bytes)),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        try:
            port = server.add_insecure_port(_address(self.host, self.port))
        except RuntimeError as exc:  # grpcio's "Failed to bind to address ..."
            raise OSError(f"cannot bind the gRPC port {_address(self.host, self.port)} ({exc}); is another "
                          "server on that port? set NIGHTSHIFT_GRPC_PORT") from None
        await server.start()
        self._server, self.port = server, int(port)
        logging.getLogger("nightshift.serving.lifecycle").info("OIP gRPC service on %s", self.target)

    async def stop(self) -> None:
        """Refuse new RPCs (GOAWAY), let in-flight ones finish up to ``grace_s``, then close."""
        if self._server is not None:
            await self._server.stop(self.grace_s)
            self._server = None

    # -- the methods' work, shared by the servicer -----------------------------------------

    def check_model(self, name: str, version: str) -> None:
        """``NOT_FOUND`` for a model or version this server does not serve (as over HTTP)."""
        model = self.app.model
        if name != model.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {model.name!r}")
        if version and model.ready and version != model.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; the served version is {model.version!r}")

    def ready(self) -> bool:
        return self.app.model.ready and not self.app.draining

    def model_metadata(self) -> pb.ModelMetadataResponse:
        """The model's metadata as a message, built once (the model never changes once loaded)."""
        if self._metadata is None:
            md = self.app.model.metadata()  # raises ModelNotReady before the model loads
            resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
            for t in md["inputs"]:
                resp.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in md["outputs"]:
                resp.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            self._metadata = resp
        return self._metadata

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One ``ModelInfer``: validate, run through the shared batcher, answer, log a sample."""
        app, model = self.app, self.app.model
        self.check_model(request.model_name, request.model_version)
        model._require_ready()
        t_pre = time.perf_counter()
        pixels, wanted = self.pixels(request)
        app.metrics.stage("preprocess", time.perf_counter() - t_pre)
        result = await app.batcher.submit(pixels)
        app.metrics.stage("queue", result.queue_s)
        app.metrics.stage("inference", result.inference_s)
        t_ser = time.perf_counter()
        outputs = model.select_outputs(result.outputs, wanted, pixels.shape[0])
        resp = encode_response(model.name, model.version, request.id, outputs,
                               raw=bool(request.raw_input_contents))
        app.metrics.stage("serialization", time.perf_counter() - t_ser)
        app._log_sample(pixels, result.outputs, "infer")
        return resp

    def pixels(self, request: pb.ModelInferRequest) -> tuple[np.ndarray, list[str]]:
        """The request's ``uint8`` NHWC batch and the outputs it wants.

        The rules of :meth:`serving.model.Model.preprocess` (one ``UINT8`` input of the
        model's name, shape ``[n, H, W, C]``, ``1 <= n <= max_batch``, exactly the bytes
        the shape needs), with the messages naming the protobuf fields.

        :raises InvalidInput: the message names the field and what was expected.
        :raises PayloadTooLarge: the batch is larger than the model's ``max_batch``.
        """
        model = self.app.model
        h, w, c = model.input_shape
        inputs = request.inputs
        if not inputs:
            raise InvalidInput(f"the request has no inputs; expected one tensor named {model.input_name!r} "
                               f"(UINT8, shape [n, {h}, {w}, {c}])")
        if len(inputs) != 1:
            raise InvalidInput(f"inputs must hold exactly one tensor ({model.input_name!r}), got {len(inputs)}")
        tensor = inputs[0]
        shape = list(tensor.shape)
        n = model.check_tensor(tensor.name, tensor.datatype, shape)
        expected = n * h * w * c
        raw = request.raw_input_contents
        if raw:
            if len(raw) != 1:
                raise InvalidInput(f"raw_input_contents has {len(raw)} entries for 1 input; send one per input")
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidInput("inputs[0] has contents and raw_input_contents[0]; send one of them")
            data = raw[0]
            if len(data) != expected:
                raise InvalidInput(f"raw_input_contents[0] has {len(data)} bytes but inputs[0].shape {shape} needs "
                                   f"{expected} (UINT8: one byte per value)")
            arr = np.frombuffer(data, dtype=np.uint8).reshape(n, h, w, c)
        else:
            arr = _typed_pixels(tensor.contents, expected, shape).reshape(n, h, w, c)
        wanted = model._requested_outputs([{"name": o.name} for o in request.outputs] or None)
        return arr, wanted


def _typed_pixels(contents: pb.InferTensorContents, expected: int, shape: list[int]) -> np.ndarray:
    """UINT8 values sent in ``inputs[0].contents.uint_contents`` (the only field for UINT8)."""
    wrong = [f.name for f, _ in contents.ListFields() if f.name != "uint_contents"]
    if wrong:
        raise InvalidInput(f"inputs[0].contents.{wrong[0]} is set; UINT8 values go in "
                           "inputs[0].contents.uint_contents (or send raw_input_contents)")
    values = contents.uint_contents
    if not values:
        raise InvalidInput("inputs[0] carries no data: send raw_input_contents or inputs[0].contents.uint_contents")
    if len(values) != expected:
        raise InvalidInput(f"inputs[0].contents.uint_contents has {len(values)} values but inputs[0].shape {shape} "
                           f"needs {expected} (= {' x '.join(map(str, shape))})")
    arr = np.fromiter(values, dtype=np.uint32, count=len(values))
    if int(arr.max()) > 255:
        bad = int(np.flatnonzero(arr > 255)[0])
        raise InvalidInput(f"inputs[0].contents.uint_contents[{bad}] = {int(arr[bad])} is outside 0..255 (UINT8)")
    return arr.astype(np.uint8)


def encode_response(model_name: str, model_version: str, request_id: str,
                    outputs: list[tuple[str, str, np.ndarray]], *, raw: bool) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` for ``outputs`` (:meth:`serving.model.Model.select_outputs`).

    :param raw: answer with ``raw_output_contents`` (the request sent raw inputs); otherwise
        with typed contents, unless an output's datatype has no typed field (FP16): then raw,
        for every output (the protocol allows one form per answer).
    """
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    raw = raw or any(dt not in _CONTENTS_FIELD for _, dt, _ in outputs)
    for name, datatype, arr in outputs:
        tensor = resp.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if raw:
            resp.raw_output_contents.append(_tensor_bytes(datatype, arr))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.reshape(-1))
        else:
            getattr(tensor.contents, _CONTENTS_FIELD[datatype]).extend(arr.reshape(-1).tolist())
    return resp


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The generated servicer's methods, each answered, counted and (sampled) access-logged
    the way the HTTP app answers its routes."""

    def __init__(self, service: GrpcService):
        self.service = service
        self.app = service.app

    async def _answer(self, route: str, method: str, context: grpc.aio.ServicerContext, work: Any) -> Any:
        """Run ``work`` (a function, returning the answer or an awaitable of it), count and
        time the outcome, and end the RPC with the gRPC status of a serving error."""
        t0 = time.perf_counter()
        try:
            result = work()
            if inspect.isawaitable(result):
                result = await result
        except InferenceError as exc:
            status, code, message = int(exc.status), grpc_status(exc), exc.message
            if status >= 500:
                log.warning("gRPC %s -> %s: %s", method, code.name, message)
        except asyncio.CancelledError:  # the client cancelled or its deadline passed: nobody to answer
            self.app.metrics.disconnects.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: answer INTERNAL, keep serving
            log.exception("unhandled error in gRPC %s", method)
            status, code = 500, grpc.StatusCode.INTERNAL
            message = f"internal server error: {type(exc).__name__}: {exc}"
        else:
            self._observe(route, method, 200, grpc.StatusCode.OK, context, time.perf_counter() - t0)
            return result
        self._observe(route, method, status, code, context, time.perf_counter() - t0)
        await context.abort(code, message)  # raises: the RPC ends with this status

    def _observe(self, route: str, method: str, status: int, code: grpc.StatusCode,
                 context: grpc.aio.ServicerContext, seconds: float) -> None:
        app = self.app
        app.metrics.observe_request(route, "GRPC", status, seconds)
        sample = app.config.access_log_sample
        if sample > 0 and (status >= 500 or app._rng.random() < sample):
            access_log.info("request", extra={"fields": {
                "client": context.peer(), "method": "GRPC", "path": SERVICE + method, "route": route,
                "status": status, "grpc_status": code.name, "duration_ms": round(seconds * 1000, 3)}})

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return await self._answer("live", "ServerLive", context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return await self._answer("ready", "ServerReady", context,
                                  lambda: pb.ServerReadyResponse(ready=self.service.ready()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        def work() -> pb.ModelReadyResponse:
            self.service.check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.service.ready())

        return await self._answer("model_ready", "ModelReady", context, work)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return await self._answer("server_metadata", "ServerMetadata", context, lambda: pb.ServerMetadataResponse(
            name="nightshift-serving", version=__version__, extensions=EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        def work() -> pb.ModelMetadataResponse:
            self.service.check_model(request.name, request.version)
            return self.service.model_metadata()

        return await self._answer("model_metadata", "ModelMetadata", context, work)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        service = self.service
        service.inflight += 1
        try:
            return await self._answer("infer", "ModelInfer", context, lambda: service.infer(request))
        finally:
            service.inflight -= 1


__all__ = ["GrpcService", "check_port_free", "encode_response", "grpc_status"]
