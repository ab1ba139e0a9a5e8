"""Small bad requests: deep JSON, gzip bombs, oversized or too many header fields (issue 19, item 10).

Each is answered 4xx (never 500), costs the server little, and leaves it serving.
"""

from __future__ import annotations

import gzip
import json
import select
import socket
import time
import types
import zlib

import numpy as np
import pytest
import requests

from nightshift.serving import protocol
from nightshift.serving.app import AppConfig
from nightshift.serving.errors import InvalidInput, PayloadTooLarge
from nightshift.serving.protocol import (
    BODY_LIMIT_WHY,
    JSON_BYTES_PER_VALUE,
    MAX_JSON_DEPTH,
    REQUEST_OVERHEAD_BYTES,
    InferLimits,
    decompress,
    json_too_deep,
    parse_request,
)
from nightshift.serving.server import Model, make_server

#: the tiny model of the fixtures: 4x4x1 images, at most 8 per request
TINY_JSON_LIMIT = REQUEST_OVERHEAD_BYTES + 8 * 16 * JSON_BYTES_PER_VALUE


@pytest.fixture
def http():
    with requests.Session() as s:
        s.trust_env = False
        yield s


def _good_json(n: int = 2) -> bytes:
    x = np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1)
    return json.dumps({"inputs": [{"name": "pixels", "shape": [n, 4, 4, 1], "datatype": "UINT8",
                                   "data": x.tolist()}]}).encode()


def _infer(http, url: str, body: bytes, **headers) -> requests.Response:
    return http.post(f"{url}/v2/models/tiny/infer", data=body,
                     headers={"Content-Type": "application/json", **headers}, timeout=10)


def _assert_still_serving(http, url: str) -> None:
    r = _infer(http, url, _good_json())
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == 2


def _serve(model_dir, *, config: AppConfig | None = None, **uvicorn_kw):
    model = Model(model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    return make_server(model, "127.0.0.1", 0, config=config or AppConfig(), **uvicorn_kw).start()


@pytest.fixture
def default_server(tiny_onnx_model_dir):
    """The tiny model with the default limits (a 64 MiB body limit, as deployed)."""
    srv = _serve(tiny_onnx_model_dir)
    yield srv
    srv.shutdown()
    srv.server_close()


# ----------------------------------------------------------------------------- deep JSON


@pytest.mark.parametrize("body", [
    # under the tiny model's body cap (66,560 bytes; a 28x28 model's is 1.7 MB): parsed, not refused by size
    pytest.param(b"[" * 60_000, id="60k-arrays"),
    pytest.param(b'{"a":' * 12_000, id="12k-objects"),
    pytest.param(b'{"inputs":[{"name":"pixels","data":' + b"[" * 40 + b"0" + b"]" * 40 + b"}]}", id="40-deep-data"),
])
def test_deeply_nested_json_is_400_and_the_server_keeps_serving(default_server, http, body):
    r = _infer(http, default_server.url, body)
    assert r.status_code == 400, r.text  # was 500 "internal server error: RecursionError"
    assert r.headers["content-type"] == "application/json"
    assert f"more than {MAX_JSON_DEPTH} levels deep" in r.json()["error"]
    _assert_still_serving(http, default_server.url)


def test_a_deep_json_header_of_a_binary_request_is_400(default_server, http):
    x = np.zeros((1, 4, 4, 1), np.uint8)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 16}}],
                       "id": "x", "parameters": {"deep": json.loads("[" * 50 + "]" * 50)}}).encode()
    r = http.post(f"{default_server.url}/v2/models/tiny/infer", data=head + x.tobytes(),
                  headers={"Inference-Header-Content-Length": str(len(head)),
                           "Content-Type": "application/octet-stream"}, timeout=10)
    assert r.status_code == 400 and "the JSON header of the binary request nests" in r.json()["error"]


def test_json_depth_counts_brackets_outside_strings_only():
    assert not json_too_deep(b'{"inputs":[{"data":[[[[1]]]]}]}')
    assert not json_too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert json_too_deep(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert json_too_deep(b"[" * 200_000)
    # many brackets, little depth: siblings, and brackets inside strings (escaped quotes too)
    assert not json_too_deep(b"[" + b"[[]]," * 10_000 + b"[]]")
    assert not json_too_deep(json.dumps({"id": "[" * 100, "s": ['\\"{{{' * 40, "{" * 60]}).encode())
    # an escaped backslash ends a string: the brackets after it count
    assert json_too_deep(b'["\\\\", ' + b"[" * 40 + b"]" * 41)
    # deep nesting after a wide start, across the scan's chunks
    assert json_too_deep(b"[" + b"[]," * 600_000 + b"[" * 40 + b"]" * 41)
    # a regular nested batch as a client's tolist() sends it is not deep
    body = _good_json(8)
    assert not json_too_deep(body) and parse_request(body, None)[0]["inputs"][0]["shape"] == [8, 4, 4, 1]
    with pytest.raises(InvalidInput, match="request body nests arrays and objects more than 32 levels"):
        parse_request(b"[" * 200_000, None)
    with pytest.raises(InvalidInput, match="more than 32 levels"):  # json itself would accept 33
        parse_request(b'{"id":' + b"[" * 33 + b"]" * 33 + b"}", None)


# ----------------------------------------------------------------------------- gzip bombs and body caps


class _InflateSpy:
    """``zlib`` for :mod:`serving.protocol`, counting every byte its decompressors produce."""

    def __init__(self):
        self.produced = 0
        self.error = zlib.error

    def decompressobj(self, *args, **kwargs):
        spy, real = self, zlib.decompressobj(*args, **kwargs)

        class Counting:
            def decompress(self, data, max_length=0):
                out = real.decompress(data, max_length)
                spy.produced += len(out)
                return out

            def __getattr__(self, name):
                return getattr(real, name)

        return Counting()


def test_a_gzip_bomb_is_refused_without_inflating_past_what_the_largest_batch_needs(default_server, http,
                                                                                    monkeypatch):
    spy = _InflateSpy()
    monkeypatch.setattr(protocol, "zlib", types.SimpleNamespace(decompressobj=spy.decompressobj, error=zlib.error))
    head = b'{"inputs":[{"name":"pixels","shape":[8,4,4,1],"datatype":"UINT8","data":['
    bomb = gzip.compress(head + b"0," * 4_000_000 + b"0]}]}", 9)  # 8 MB of JSON in ~8 KB
    assert len(bomb) < 20_000
    t0 = time.process_time()
    r = _infer(http, default_server.url, bomb, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert f"decompressed request body exceeds {TINY_JSON_LIMIT} bytes" in error
    assert "NIGHTSHIFT_MAX_BATCH=8 images of 4x4x1" in error
    assert spy.produced <= TINY_JSON_LIMIT + 1  # inflated up to the cap, not the 8 MB (nor the 64 MiB body limit)
    assert time.process_time() - t0 < 5  # generous: the old code parsed all 8 MB on the event loop

    spy.produced = 0
    good = _good_json(8)
    r = _infer(http, default_server.url, gzip.compress(good), **{"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [8, 3]
    assert spy.produced == len(good)


def test_a_truncated_or_padded_gzip_body_is_400(default_server, http):
    z = gzip.compress(_good_json())
    r = _infer(http, default_server.url, z[:-8], **{"Content-Encoding": "gzip"})  # the trailer (CRC, size) cut off
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    r = _infer(http, default_server.url, z + b"junk", **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "4 bytes after the end of its gzip stream" in r.json()["error"]
    assert _infer(http, default_server.url, z, **{"Content-Encoding": "gzip"}).status_code == 200


def test_infer_limits_follow_the_largest_batch():
    lim = InferLimits(max_batch=256, image_shape=(28, 28, 1), max_body_bytes=64 << 20)
    assert lim.tensor_bytes == 256 * 784
    assert lim.limit(None) == lim.json_limit == REQUEST_OVERHEAD_BYTES + 256 * 784 * JSON_BYTES_PER_VALUE
    assert "NIGHTSHIFT_MAX_BATCH=256 images of 28x28x1 can need as JSON" in lim.why(None)
    assert lim.limit("120") == 120 + 256 * 784  # binary: the header and exactly the tensor bytes
    assert "120-byte JSON header" in lim.why("120") and "binary tensor data" in lim.why("120")
    assert lim.limit("x") == lim.limit("-1") == lim.json_limit
    assert lim.limit(str(lim.json_limit + 1)) == lim.json_limit  # a header longer than any JSON request
    # a smaller body limit wins, and the message names that setting
    small = InferLimits(max_batch=256, image_shape=(28, 28, 1), max_body_bytes=100_000)
    assert small.limit(None) == small.limit("120") == 100_000
    assert small.why(None) == small.why("120") == BODY_LIMIT_WHY
    # decompress never produces more than the limit + 1
    with pytest.raises(PayloadTooLarge, match=r"exceeds 1000 bytes"):
        decompress(gzip.compress(b"0" * 10**6), "gzip", 1000)
    assert decompress(gzip.compress(b"0" * 1000), "gzip", 1000) == b"0" * 1000


def test_a_binary_body_larger_than_its_header_and_the_largest_batch_is_413_unread(default_server, http):
    x = np.zeros((8, 4, 4, 1), np.uint8)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [8, 4, 4, 1], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 128}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    url = f"{default_server.url}/v2/models/tiny/infer"
    assert http.post(url, data=head + x.tobytes(), headers=headers, timeout=10).status_code == 200
    r = http.post(url, data=head + x.tobytes() + b"\0", headers=headers, timeout=10)
    assert r.status_code == 413, r.text
    assert f"at most {len(head) + 128} (a {len(head)}-byte JSON header" in r.json()["error"]


def test_the_body_limit_setting_is_named_when_it_is_the_smaller(tiny_onnx_model_dir, http):
    srv = _serve(tiny_onnx_model_dir, config=AppConfig(max_body_bytes=500))
    try:
        r = _infer(http, srv.url, _good_json(8))
        assert r.status_code == 413 and "at most 500 (the body limit, NIGHTSHIFT_MAX_BODY_BYTES)" in r.json()["error"]
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- header fields


def _raw_request(url: str, head: bytes, *, pieces: int = 1, pause_s: float = 0.0) -> str:
    """Send ``head`` (in ``pieces`` writes), return what the server answers before it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        step = -(-len(head) // pieces)
        try:
            for i in range(0, len(head), step):
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered (and closes): stop sending, read the answer
                s.sendall(head[i:i + step])
                time.sleep(pause_s)
        except OSError:  # the server answered and closed while we were still sending
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks).decode("latin-1")


def _json_error(answer: str) -> str:
    return json.loads(answer.split("\r\n\r\n", 1)[1])["error"]


def test_too_many_header_fields_is_431(default_server, http):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))  # + Host: 101
    answer = _raw_request(default_server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert "connection: close" in answer.lower()
    assert "more than 100 header fields (NIGHTSHIFT_MAX_HEADERS)" in _json_error(answer)
    # 100 fields in all are fine
    answer = _raw_request(default_server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          + fields[: fields.index(b"X-F98")] + b"\r\n")
    assert answer.startswith("HTTP/1.1 200"), answer[:200]
    _assert_still_serving(http, default_server.url)


@pytest.mark.parametrize(("head", "needle"), [
    pytest.param(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                 "header fields exceed 16384 bytes", id="one-large-field"),
    pytest.param(b"GET /v2/health/live?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 "request line exceeds 16384 bytes", id="long-request-line"),
])
def test_oversized_header_fields_are_431(default_server, http, head, needle):
    answer = _raw_request(default_server.url, head)
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert needle in _json_error(answer) and "NIGHTSHIFT_MAX_HEADER_BYTES" in _json_error(answer)
    _assert_still_serving(http, default_server.url)


def test_a_header_field_that_never_ends_is_431_before_it_is_all_buffered(default_server, http):
    # 12 writes of 8 KiB, the field never ends: httptools would buffer it for ever
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (96 << 10)
    answer = _raw_request(default_server.url, head, pieces=12, pause_s=0.05)
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert "header fields exceed 16384 bytes" in _json_error(answer)
    _assert_still_serving(http, default_server.url)


def test_header_limits_are_settable_and_pipelined_requests_pass(tiny_onnx_model_dir, http):
    srv = _serve(tiny_onnx_model_dir, max_headers=3, max_header_bytes=200)
    try:
        ok = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = _raw_request(srv.url, ok + ok + last)
        assert answer.count("HTTP/1.1 200") == 3
        answer = _raw_request(srv.url, b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        assert answer.startswith("HTTP/1.1 431") and "more than 3 header fields" in _json_error(answer)
        answer = _raw_request(srv.url, b"GET / HTTP/1.1\r\nHost: x\r\nA: " + b"1" * 200 + b"\r\n\r\n")
        assert answer.startswith("HTTP/1.1 431") and "exceed 200 bytes" in _json_error(answer)
        # a body does not count as header bytes, sent with its head or after it
        body = _good_json(8)
        assert len(body) > 4 * 200
        head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        for pieces in (1, 8):
            answer = _raw_request(srv.url, head % len(body) + body, pieces=pieces, pause_s=0.02)
            assert answer.startswith("HTTP/1.1 200"), answer[:300]
    finally:
        srv.shutdown()
        srv.server_close()
