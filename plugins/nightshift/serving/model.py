"""One ONNX classifier behind the Open Inference Protocol: load, validate, run.

Only :mod:`numpy` and :mod:`onnxruntime` (imported in :meth:`Model.load`): this
file is copied into the inference image and runs there without the rest of
Nightshift.

The served model directory holds ``model.onnx`` and ``model.json`` (see
``docs/architecture.md``). The model takes ``uint8`` NHWC pixels and returns
``logits``, ``probabilities`` (softmax inside the graph) and ``embedding``
(``float32``); models exported before ``probabilities`` existed return only
``logits`` and ``embedding`` and still load. The server exposes exactly the
graph's outputs and adds ``label`` (``BYTES``), the class name of each row's
arg-max; a request that names no outputs gets all of them.

Input validation is plain numpy and cheap: :meth:`Model.preprocess` turns an
OIP request (JSON data or the binary tensor extension) into the input batch or
raises :class:`~serving.errors.InvalidInput` naming the field.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InferenceFailed, InvalidInput, ModelLoadError, ModelNotReady, PayloadTooLarge

log = logging.getLogger("nightshift.serving")

DEFAULT_MAX_BATCH = 256

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


def probabilities(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class probabilities per row (``float64``): the model's ``probabilities`` output
    (softmax inside the graph), or the softmax of ``logits`` for a model exported
    without it (models made before the output existed)."""
    p = outputs.get("probabilities")
    if p is not None:
        return np.asarray(p, dtype=np.float64)
    logits = np.asarray(outputs["logits"], dtype=np.float64)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


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

        ort.disable_telemetry_events()  # no usage telemetry from a server (and no stray non-JSON log line)
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        opts.inter_op_num_threads = 1
        # no busy-waiting between ops: the event loop and other containers share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("NIGHTSHIFT_ORT_SPIN", "0"))
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
        listed = meta.get("outputs")
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(o, str) for o in listed):
                raise ModelLoadError(f"{meta_path}: 'outputs' must be a list of output names, got {listed!r}")
            missing = [o for o in listed if o not in output_names]
            if missing:
                raise ModelLoadError(
                    f"{meta_path} lists outputs {missing} that the ONNX graph does not have (it has {output_names})"
                )
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

    def check_tensor(self, name: Any, datatype: Any, shape: Any) -> int:
        """Check an input tensor's name, datatype and shape (HTTP and gRPC alike); return its batch size.

        :raises InvalidInput: naming the field (``inputs[0].<field>``) and what was expected.
        :raises PayloadTooLarge: the batch is larger than ``max_batch``.
        """
        if name != self.input_name:
            raise InvalidInput(f"inputs[0].name is {name!r}; this model's input is named {self.input_name!r}")
        if datatype != "UINT8":
            raise InvalidInput(f"inputs[0].datatype is {datatype!r}; input {self.input_name!r} must be 'UINT8'")
        h, w, c = self.input_shape
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"inputs[0].shape must be a list of integers [n, {h}, {w}, {c}], got {shape!r}")
        if len(shape) != 4 or shape[1:] != [h, w, c]:
            raise InvalidInput(f"inputs[0].shape is {shape}; expected [n, {h}, {w}, {c}] (NHWC, n = batch size)")
        n = shape[0]
        if n < 1:
            raise InvalidInput(f"inputs[0].shape has batch size {n}; it must be at least 1")
        if n > self.max_batch:
            raise PayloadTooLarge(f"batch size {n} exceeds this server's maximum of {self.max_batch}; "
                                  "split the request")
        return n

    def preprocess(self, request: Any, binary: dict[str, memoryview] | None = None) -> tuple[np.ndarray, list[str]]:
        """Validate an OIP infer request and turn it into the input array.

        :param request: the decoded JSON body (or the JSON header of a binary request).
        :param binary: input name -> raw bytes, for inputs sent with the binary
            tensor data extension (``parameters.binary_data_size``).
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
        shape = tensor.get("shape")
        n = self.check_tensor(tensor.get("name"), tensor.get("datatype"), shape)
        h, w, c = self.input_shape

        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"inputs[0].parameters must be an object, got {type(params).__name__}")
        expected = n * h * w * c
        if "binary_data_size" in params:
            raw = (binary or {}).get(self.input_name)
            if raw is None:
                raise InvalidInput("inputs[0] declares binary_data_size but the request carries no binary data "
                                   "(send Inference-Header-Content-Length)")
            if len(raw) != expected:
                raise InvalidInput(
                    f"inputs[0] carries {len(raw)} bytes of binary data but shape {shape} needs {expected} (UINT8)"
                )
            if "data" in tensor:
                raise InvalidInput("inputs[0] has both 'data' and binary_data_size; send one of them")
            arr = np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, c)
            return arr, self._requested_outputs(request.get("outputs"))

        data = tensor.get("data")
        if not isinstance(data, list):
            raise InvalidInput(f"inputs[0].data must be a list of integers 0..255, got {type(data).__name__}")
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

    def select_outputs(self, outputs: dict[str, np.ndarray], wanted: list[str],
                       n: int) -> list[tuple[str, str, np.ndarray]]:
        """Check the model's outputs and pick the requested ones (adds ``label``).

        :returns: ``(name, OIP datatype, array)`` per requested output, in
            request order; ``label`` is an array of ``str``.
        :raises InferenceFailed: an output has the wrong batch size or holds NaN/inf.
        """
        result: list[tuple[str, str, np.ndarray]] = []
        logits = outputs["logits"]
        if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] != len(self.class_names):
            raise InferenceFailed(
                f"model returned logits of shape {list(logits.shape)}, expected [{n}, {len(self.class_names)}]"
            )
        for name in wanted:
            if name == "label":
                idx = np.argmax(logits, axis=1)
                result.append(("label", "BYTES", np.asarray([self.class_names[int(i)] for i in idx], dtype=object)))
                continue
            arr = outputs[name]
            if arr.ndim < 1 or arr.shape[0] != n:
                raise InferenceFailed(f"model output {name!r} has shape {list(arr.shape)}, expected batch size {n}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InferenceFailed(f"model output {name!r} contains NaN or infinity")
            result.append((name, self.output_types[name][0], arr))
        return result
