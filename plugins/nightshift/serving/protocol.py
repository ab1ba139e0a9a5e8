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
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidInput, PayloadTooLarge

#: Request/response header naming the JSON part's length in a binary body.
HEADER_LENGTH = "inference-header-content-length"
#: Extensions this server implements (``GET /v2``).
EXTENSIONS = ["binary_tensor_data", "classification_upload", "model_version_path"]

_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "UINT8": "u1", "INT8": "i1", "INT32": "<i4",
           "INT64": "<i8", "BOOL": "?"}


#: Deepest nesting of arrays and objects a JSON request may have. An OIP infer request
#: needs 7 (the body, ``inputs``, the tensor, four levels of NHWC ``data``); deeper JSON
#: is refused before it is parsed (400), so no deep structure reaches the parser's
#: recursion or the code that walks the request.
MAX_JSON_DEPTH = 32
#: The most bytes one UINT8 value may take in a JSON infer body: ``255, `` and its share
#: of the brackets of nested ``data`` (``[255], `` is 7). Pretty-printed JSON takes more.
JSON_BYTES_PER_VALUE = 8
#: Room in an infer body for everything but the pixel values: names, shape, parameters,
#: outputs, id; for a binary request, the whole JSON header.
REQUEST_OVERHEAD_BYTES = 64 << 10


#: why a body limit is ``NIGHTSHIFT_MAX_BODY_BYTES`` (the 413 message names the setting)
BODY_LIMIT_WHY = "the body limit, NIGHTSHIFT_MAX_BODY_BYTES"


class InferLimits:
    """The largest infer body (after decompression) a server of this model accepts.

    A request carries at most ``max_batch`` images of ``image_shape`` UINT8 values. As
    JSON that is at most :data:`JSON_BYTES_PER_VALUE` bytes per value plus
    :data:`REQUEST_OVERHEAD_BYTES`; as binary tensor data, exactly ``max_batch x H x W x C``
    bytes after a JSON header of ``Inference-Header-Content-Length`` bytes (itself at
    most the JSON limit: it may carry the pixels as JSON). A larger body cannot be a
    valid request, so it is refused (413) from ``Content-Length``, while it arrives, or
    while it inflates, never parsed on the event loop (a 55 KB gzip body can inflate to
    57 MB of JSON). ``max_body_bytes`` (``NIGHTSHIFT_MAX_BODY_BYTES``) caps both.
    Computed once per model; :meth:`limit` is a few integer operations per request, and
    :meth:`why` builds the 413 message only for a refused request.
    """

    def __init__(self, *, max_batch: int, image_shape: tuple[int, ...], max_body_bytes: int):
        self.max_batch = int(max_batch)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.max_body_bytes = int(max_body_bytes)
        self.tensor_bytes = self.max_batch
        for d in self.image_shape:
            self.tensor_bytes *= d
        #: the largest JSON body (and JSON header of a binary body)
        self.json_limit = min(self.max_body_bytes, REQUEST_OVERHEAD_BYTES + self.tensor_bytes * JSON_BYTES_PER_VALUE)

    def limit(self, header_length: str | None) -> int:
        """The largest body with this ``Inference-Header-Content-Length`` (``None``: a JSON
        body). A malformed header length gets the JSON limit (the parse then says what is wrong)."""
        if header_length is None:
            return self.json_limit
        try:
            hl = int(header_length)
        except ValueError:
            return self.json_limit
        if hl < 0 or hl > self.json_limit:
            return self.json_limit
        return min(self.max_body_bytes, hl + self.tensor_bytes)

    def why(self, header_length: str | None) -> str:
        """Where :meth:`limit` comes from, naming the setting (for the 413 message)."""
        limit = self.limit(header_length)
        if limit == self.max_body_bytes:
            return BODY_LIMIT_WHY
        batch = f"NIGHTSHIFT_MAX_BATCH={self.max_batch} images of {'x'.join(map(str, self.image_shape))}"
        if limit == self.json_limit:
            return (f"the most a request of {batch} can need as JSON ({JSON_BYTES_PER_VALUE} bytes per value, "
                    f"plus {REQUEST_OVERHEAD_BYTES} for the rest); send fewer images per request")
        return (f"a {limit - self.tensor_bytes}-byte JSON header and the most a request of {batch} can need "
                "as binary tensor data; send fewer images per request")


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate, refusing results over ``limit`` bytes.

    Inflates in one bounded step (``max_length``): never more than ``limit + 1`` bytes
    are produced, however far the body would inflate.

    :raises InvalidInput: unknown encoding, corrupt or truncated data, bytes after the stream.
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
    if not d.eof:
        raise InvalidInput(f"the {enc} request body is truncated (its stream does not end)")
    if d.unused_data:
        raise InvalidInput(f"the request body has {len(d.unused_data)} bytes after the end of its {enc} stream")
    return out


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
#: every byte but the brackets and the quote: deleted before the depth is counted
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests arrays and objects more than ``limit`` deep.

    Linear and in C (``bytes.count``/``translate``, ``re``, numpy), without parsing: text
    with at most ``limit`` opening brackets cannot be too deep (a binary request's JSON
    header, a flat ``data`` list: two ``count`` calls); otherwise escapes and strings are
    removed and the running depth of the brackets that are left is computed. Brackets
    inside strings do not count. Invalid JSON may be judged either way; the parser
    refuses it next.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    s = raw.translate(None, _NOT_STRUCTURE)
    if b'"' in s:
        s = _STRING.sub(b"", s)
    a = np.frombuffer(s, np.uint8)
    depth = 0
    for i in range(0, len(a), 1 << 20):  # bounded temporaries for a large body
        # '[' 0x5B and '{' 0x7B have bit 1 set, ']' 0x5D and '}' 0x7D do not: +1 / -1
        run = np.cumsum((a[i:i + (1 << 20)] & 2).view(np.int8) - 1, dtype=np.int32) + depth
        if int(run.max()) > limit:
            return True
        depth = int(run[-1])
    return False


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
    data = bytes(raw)
    if json_too_deep(data):
        raise _too_deep(what)
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not UTF-8 text: {exc}; binary tensors need the "
                           "Inference-Header-Content-Length header") from exc
    except RecursionError:  # a second fence: json_too_deep should have refused it
        raise _too_deep(what) from None
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _too_deep(what: str) -> InvalidInput:
    return InvalidInput(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
                        "an OIP infer request needs at most 7")


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


@dataclass(eq=False)
class InferPlan:
    """What an infer request's JSON part asks for, validated: the input's shape, the outputs
    to return and how (:meth:`serving.model.Model.preprocess`, :func:`binary_outputs`).

    A binary client sends the same JSON header with every request (``tritonclient``, the
    load generator: only the tensor bytes change), so the server keeps the plan of a header
    it has seen (:class:`PlanCache`) and neither parses nor validates it again. The answer's
    JSON header is kept on the plan too when every output is binary and fixed-size: it is
    then the same bytes for every answer (:func:`encode_planned`).
    """

    shape: tuple[int, ...]
    wanted: list[str]
    binary_default: bool
    binary_per_output: dict[str, bool]
    request_id: Any
    response_head: bytes | None = None
    response_key: tuple | None = None


class PlanCache:
    """Plans of binary requests by their JSON header bytes and body length, at most
    ``max_entries`` (oldest out first; 0 keeps none). Event-loop thread only: no lock.

    The key is everything validation reads: the JSON header itself and the body's length
    (the binary sizes must add up to it); the served model never changes in a process.
    Only plans whose input came as binary data are kept: a cached plan's pixels are read
    from the bytes after the header.
    """

    def __init__(self, max_entries: int = 256):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = int(max_entries)
        self._plans: dict[tuple[bytes, int], InferPlan] = {}
        self.hits = 0

    #: longest JSON header kept (a plan's key holds it: 256 headers of up to the body limit
    #: would be gigabytes); a longer one is parsed every time
    MAX_HEADER_BYTES = 4096

    def key(self, body: bytes, header_length: str) -> tuple[bytes, int] | None:
        """The cache key of a binary body, or ``None`` when the cache is off, or the header
        length is malformed (the full parse then says what is wrong) or longer than
        :attr:`MAX_HEADER_BYTES`."""
        if not self.max_entries:
            return None
        try:
            hl = int(header_length)
        except ValueError:
            return None
        if hl < 0 or hl > len(body) or hl > self.MAX_HEADER_BYTES:
            return None
        return bytes(body[:hl]), len(body)

    def get(self, key: tuple[bytes, int]) -> InferPlan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
        return plan

    def put(self, key: tuple[bytes, int], plan: InferPlan) -> None:
        """Keep ``plan`` for ``key`` (a key from :meth:`key`, so the cache is on)."""
        if len(self._plans) >= self.max_entries:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = plan

    def __len__(self) -> int:
        return len(self._plans)


def encode_planned(plan: InferPlan, *, model_name: str, model_version: str,
                   outputs: list[tuple[str, str, np.ndarray]]) -> tuple[bytes, dict[str, str]]:
    """:func:`encode_response` for ``plan``, reusing the plan's answer header when it fits.

    The header of an all-binary, fixed-size answer depends only on the outputs' names,
    datatypes and shapes (``binary_data_size`` follows from them); it is built once and
    kept on the plan with those as its key.
    """
    key = tuple((name, dt, arr.shape) for name, dt, arr in outputs)
    head = plan.response_head
    if head is not None and key == plan.response_key:
        return b"".join([head, *(_tensor_bytes(dt, arr) for _, dt, arr in outputs)]), {
            "content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    body, headers = encode_response(model_name=model_name, model_version=model_version, outputs=outputs,
                                    binary_default=plan.binary_default,
                                    binary_per_output=plan.binary_per_output, request_id=plan.request_id)
    per = plan.binary_per_output
    if HEADER_LENGTH in headers and all(per.get(name, plan.binary_default) and dt != "BYTES"
                                        for name, dt, _ in outputs):
        plan.response_head, plan.response_key = body[:int(headers[HEADER_LENGTH])], key
    return body, headers


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
