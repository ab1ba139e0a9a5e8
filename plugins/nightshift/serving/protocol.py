"""Open Inference Protocol (KServe v2) REST bodies: JSON and the binary tensor data extension.

Standard library + numpy only (copied into the inference image).

Binary tensor data extension (Triton's ``binary_tensor_data``, which
``tritonclient.http`` speaks): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, in the
order of the inputs (or outputs) whose ``parameters.binary_data_size`` says how
many bytes each takes. Fixed-size types are little-endian C order; ``BYTES``
elements are each a 4-byte little-endian length and the bytes.

An answer uses binary outputs when the request sets
``parameters.binary_data_output: true`` (all outputs) or an output's
``parameters.binary_data: true`` (that output; it overrides the request-level
flag). Everything else is JSON.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

from .errors import InvalidInput, PayloadTooLarge

#: Request/response header naming the JSON part's length in a binary body.
HEADER_LENGTH = "inference-header-content-length"
#: Extensions this server implements (``GET /v2``).
EXTENSIONS = ["binary_tensor_data", "classification_upload", "model_version_path"]

_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "UINT8": "u1", "INT8": "i1", "INT32": "<i4",
           "INT64": "<i8", "BOOL": "?"}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate, refusing results over ``limit`` bytes.

    :raises InvalidInput: unknown encoding or corrupt data.
    :raises PayloadTooLarge: the decompressed body is larger than ``limit``.
    """
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {enc} data: {exc}") from exc
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed request body exceeds {limit} bytes")
    return out


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Split an infer body into its JSON request and the binary inputs.

    :param body: the whole (decompressed) body.
    :param header_length: the ``Inference-Header-Content-Length`` header, or ``None`` for pure JSON.
    :returns: the JSON request and input name -> raw bytes (empty for pure JSON).
    :raises InvalidInput: bad JSON, a bad header length, or binary sizes that do not add up.
    """
    if header_length is None:
        return _loads(body, "request body"), {}
    try:
        hl = int(header_length)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if hl < 0 or hl > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {hl} is outside the body's {len(body)} bytes")
    request = _loads(body[:hl], "the JSON header of the binary request")
    view = memoryview(body)[hl:]
    binary: dict[str, memoryview] = {}
    offset = 0
    for i, tensor in enumerate(request.get("inputs") or []):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"inputs[{i}].parameters.binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(view):
            raise InvalidInput(f"inputs[{i}] declares {size} binary bytes but only {len(view) - offset} remain "
                               "after the JSON header")
        binary[str(tensor.get("name"))] = view[offset:offset + size]
        offset += size
    if offset != len(view):
        raise InvalidInput(f"the body has {len(view) - offset} bytes after the JSON header that no input's "
                           "binary_data_size accounts for")
    return request, binary


def _loads(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not UTF-8 text: {exc}; binary tensors need the "
                           "Inference-Header-Content-Length header") from exc
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def binary_outputs(request: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
    """The request's binary-output wishes: the request-level default and per-output overrides.

    :raises InvalidInput: a flag is not a boolean.
    """
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"'parameters' must be an object, got {type(params).__name__}")
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidInput(f"parameters.binary_data_output must be true or false, got {default!r}")
    per: dict[str, bool] = {}
    for i, o in enumerate(request.get("outputs") or []):
        if isinstance(o, dict) and isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]:
            flag = o["parameters"]["binary_data"]
            if not isinstance(flag, bool):
                raise InvalidInput(f"outputs[{i}].parameters.binary_data must be true or false, got {flag!r}")
            per[str(o.get("name"))] = flag
    return default, per


def _tensor_bytes(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in arr.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=_DTYPES[datatype]).tobytes()


def encode_response(
    *,
    model_name: str,
    model_version: str,
    outputs: list[tuple[str, str, np.ndarray]],
    binary_default: bool = False,
    binary_per_output: dict[str, bool] | None = None,
    request_id: Any = None,
) -> tuple[bytes, dict[str, str]]:
    """Serialise an infer answer.

    :param outputs: ``(name, datatype, array)`` per output (:meth:`Model.select_outputs`).
    :returns: the body and the headers to send (``Content-Type`` and, when any
        output is binary, ``Inference-Header-Content-Length``).
    """
    per = binary_per_output or {}
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if isinstance(request_id, str) and request_id:
        head["id"] = request_id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, datatype, arr in outputs:
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if per.get(name, binary_default):
            raw = _tensor_bytes(datatype, arr)
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    head["outputs"] = tensors
    header = json.dumps(head, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {"content-type": "application/octet-stream",
                                        HEADER_LENGTH: str(len(header))}
