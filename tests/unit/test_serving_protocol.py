"""OIP bodies (:mod:`nightshift.serving.protocol`): JSON and the binary tensor extension
(with NVIDIA's client), kept plans of repeated binary headers, gzip, nesting depth and the
body limits that follow the model's largest batch (issue 19, item 10: small bad requests are
answered 4xx, never 500, cost the server little and leave it serving)."""

from __future__ import annotations

import gzip
import json
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
from tests.unit.serving_support import assert_still_serving, good_json, infer, serve

TINY_JSON_LIMIT = REQUEST_OVERHEAD_BYTES + 8 * 16 * JSON_BYTES_PER_VALUE


# ----------------------------------------------------------------------------- OIP with NVIDIA's client


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_in_process(serving_server, x, tiny_onnx_forward, binary):
    import tritonclient.http as th

    client = th.InferenceServerClient(serving_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny", "1")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    inp = th.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "embedding", "label")]
    r = client.infer("tiny", [inp], outputs=outs, model_version="1", request_id="abc")
    logits, emb = tiny_onnx_forward(x)
    np.testing.assert_allclose(r.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("label")]
    assert labels == [["zero", "one", "two"][i] for i in logits.argmax(1)]
    resp = r.get_response()
    assert resp["id"] == "abc" and resp["model_version"] == "1"
    assert all(("binary_data_size" in o.get("parameters", {})) == binary for o in resp["outputs"])
    # no outputs named: tritonclient asks binary_data_output for all of them
    r = client.infer("tiny", [inp])
    assert {o["name"] for o in r.get_response()["outputs"]} == {"logits", "embedding", "label"}
    np.testing.assert_allclose(r.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)


def _binary_body(x: np.ndarray, size: int | None = None, extra: bytes = b"") -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": x.nbytes if size is None else size}}]}).encode()
    return head + x.tobytes() + extra, {"Inference-Header-Content-Length": str(len(head)),
                                        "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        pytest.param(lambda x: _binary_body(x, size=x.nbytes + 5), "only 48 remain", id="size-too-big"),
        pytest.param(lambda x: _binary_body(x, extra=b"zz"), "2 bytes after the JSON header", id="trailing-bytes"),
        pytest.param(lambda x: _binary_body(x[:, :2], size=None), "expected [n, 4, 4, 1]", id="wrong-shape"),
        pytest.param(lambda x: (_binary_body(x)[0], {"Inference-Header-Content-Length": "999999"}),
                     "outside the body", id="header-length-too-big"),
        pytest.param(lambda x: (_binary_body(x)[0], {"Inference-Header-Content-Length": "x"}),
                     "not an integer", id="header-length-not-int"),
    ],
)
def test_binary_errors_are_400(serving_server, http, x, mutate, needle):
    body, headers = mutate(x)
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", data=body, headers=headers)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_gzip_body_and_version_404(serving_server, http, x):
    import gzip

    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                   "data": x.ravel().tolist()}]}).encode()
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", data=gzip.compress(body),
                  headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [3, 3]
    r = http.post(f"{serving_server.url}/v2/models/tiny/versions/9/infer", data=body)
    assert r.status_code == 404 and "no version '9'" in r.json()["error"]


# ----------------------------------------------------------------------------- kept plans of binary headers


def _decode_binary_answer(r: requests.Response) -> tuple[dict, dict[str, np.ndarray]]:
    hl = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:hl])
    arrays, offset = {}, hl
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw = r.content[offset:offset + size]
        offset += size
        if o["datatype"] == "BYTES":
            arrays[o["name"]] = raw
        else:
            arrays[o["name"]] = np.frombuffer(raw, {"FP32": "<f4"}[o["datatype"]]).reshape(o["shape"])
    assert offset == len(r.content)
    return head, arrays


def test_a_repeated_binary_header_is_validated_once_and_never_carries_old_pixels(serving_server, http, x,
                                                                                tiny_onnx_forward):
    """The server keeps the validated plan of a binary request's JSON header (clients send the same
    header every time): later requests with that header skip the JSON parse, yet every answer is
    computed from its own pixels, carries its own request's id, and a body whose length does not
    fit the header is still refused."""
    url = f"{serving_server.url}/v2/models/tiny/infer"
    plans = serving_server.app._plans
    head = json.dumps({"id": "same-every-time",
                       "inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                   {"name": "embedding", "parameters": {"binary_data": True}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    hits0 = plans.hits
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, x.shape, dtype=np.uint8) for _ in range(4)]
    answers = []
    for batch in batches:
        r = http.post(url, data=head + batch.tobytes(), headers=headers)
        assert r.status_code == 200, r.text
        answers.append(_decode_binary_answer(r))
    assert plans.hits - hits0 == 3  # the first request made the plan; the other three used it
    for batch, (resp, arrays) in zip(batches, answers, strict=True):
        logits, emb = tiny_onnx_forward(batch)
        np.testing.assert_allclose(arrays["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["embedding"], emb, rtol=1e-5, atol=1e-5)
        assert resp["id"] == "same-every-time" and resp["model_name"] == "tiny"
    # the kept answer header is the one a fresh encode gives (same shapes, same sizes)
    assert answers[0][0] == answers[-1][0]
    # the same JSON header with two stray bytes: not the cached plan, the full parse's 400
    r = http.post(url, data=head + batches[0].tobytes() + b"zz", headers=headers)
    assert r.status_code == 400 and "2 bytes after the JSON header" in r.json()["error"]
    # a different header (the label as binary BYTES, a new id) gets its own plan, and its
    # variable-size answer is encoded afresh each time
    head2 = head.replace(b"same-every-time", b"another").replace(b'"embedding"', b'"label"')
    headers2 = {**headers, "Inference-Header-Content-Length": str(len(head2))}
    for batch in batches[:2]:
        r = http.post(url, data=head2 + batch.tobytes(), headers=headers2)
        assert r.status_code == 200, r.text
        resp, arrays = _decode_binary_answer(r)
        assert resp["id"] == "another"
        names = ["zero", "one", "two"]
        want = b"".join(len(n).to_bytes(4, "little") + n.encode()
                        for n in (names[i] for i in tiny_onnx_forward(batch)[0].argmax(1)))
        assert arrays["label"] == want


def test_json_pixels_with_binary_outputs_are_answered_every_time(serving_server, http, x, tiny_onnx_forward):
    """A header-length request whose pixels are JSON data (binary outputs only, as tritonclient
    sends with binary_data=False on the input) carries no tensor bytes after the header: it is
    parsed every time, never answered from a kept plan."""
    head = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                   "data": x.ravel().tolist()}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    logits, _ = tiny_onnx_forward(x)
    for _ in range(3):
        r = http.post(f"{serving_server.url}/v2/models/tiny/infer", data=head, headers=headers)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_decode_binary_answer(r)[1]["logits"], logits, rtol=1e-5, atol=1e-5)


def test_plan_cache_is_bounded_and_refuses_malformed_header_lengths():
    from nightshift.serving.protocol import InferPlan, PlanCache

    cache = PlanCache(max_entries=2)
    assert cache.key(b"{}abc", "x") is None and cache.key(b"{}abc", "99") is None
    assert cache.key(b"{}abc", "-1") is None
    big = b"{" + b" " * PlanCache.MAX_HEADER_BYTES + b"}"  # a long header is never kept: keys hold it
    assert cache.key(big + b"abc", str(len(big))) is None
    assert cache.key(big[-2:] + b"abc", "2") is not None
    assert PlanCache(max_entries=0).key(b"{}abc", "2") is None  # off: nothing is looked up or kept
    keys = [cache.key(b'{"n":%d}xyz' % i, "7") for i in range(3)]
    assert keys[0] == (b'{"n":0}', 10)
    for k in keys:
        cache.put(k, InferPlan((1,), ["logits"], True, {}, None))
    assert len(cache) == 2 and cache.get(keys[0]) is None  # the oldest went first
    assert cache.get(keys[2]) is not None and cache.hits == 1


# ----------------------------------------------------------------------------- deep JSON


@pytest.mark.parametrize("body", [
    # under the tiny model's body cap (66,560 bytes; a 28x28 model's is 1.7 MB): parsed, not refused by size
    pytest.param(b"[" * 60_000, id="60k-arrays"),
    pytest.param(b'{"a":' * 12_000, id="12k-objects"),
    pytest.param(b'{"inputs":[{"name":"pixels","data":' + b"[" * 40 + b"0" + b"]" * 40 + b"}]}", id="40-deep-data"),
])
def test_deeply_nested_json_is_400_and_the_server_keeps_serving(serving_default_server, http, body):
    r = infer(http, serving_default_server.url, body)
    assert r.status_code == 400, r.text  # was 500 "internal server error: RecursionError"
    assert r.headers["content-type"] == "application/json"
    assert f"more than {MAX_JSON_DEPTH} levels deep" in r.json()["error"]
    assert_still_serving(http, serving_default_server.url)


def test_a_deep_json_header_of_a_binary_request_is_400(serving_default_server, http):
    x = np.zeros((1, 4, 4, 1), np.uint8)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 16}}],
                       "id": "x", "parameters": {"deep": json.loads("[" * 50 + "]" * 50)}}).encode()
    r = http.post(f"{serving_default_server.url}/v2/models/tiny/infer", data=head + x.tobytes(),
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
    body = good_json(8)
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


def test_a_gzip_bomb_is_refused_without_inflating_past_what_the_largest_batch_needs(serving_default_server, http,
                                                                                    monkeypatch):
    spy = _InflateSpy()
    monkeypatch.setattr(protocol, "zlib", types.SimpleNamespace(decompressobj=spy.decompressobj, error=zlib.error))
    head = b'{"inputs":[{"name":"pixels","shape":[8,4,4,1],"datatype":"UINT8","data":['
    bomb = gzip.compress(head + b"0," * 4_000_000 + b"0]}]}", 9)  # 8 MB of JSON in ~8 KB
    assert len(bomb) < 20_000
    r = infer(http, serving_default_server.url, bomb, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert f"decompressed request body exceeds {TINY_JSON_LIMIT} bytes" in error
    assert "NIGHTSHIFT_MAX_BATCH=8 images of 4x4x1" in error
    # inflated up to the cap, not the 8 MB (nor the 64 MiB body limit), and refused before any of it
    # was parsed (the old code parsed all 8 MB on the event loop)
    assert spy.produced <= TINY_JSON_LIMIT + 1

    spy.produced = 0
    good = good_json(8)
    r = infer(http, serving_default_server.url, gzip.compress(good), **{"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [8, 3]
    assert spy.produced == len(good)


def test_a_truncated_or_padded_gzip_body_is_400(serving_default_server, http):
    z = gzip.compress(good_json())
    r = infer(http, serving_default_server.url, z[:-8], **{"Content-Encoding": "gzip"})  # the trailer (CRC, size) cut off
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    r = infer(http, serving_default_server.url, z + b"junk", **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "4 bytes after the end of its gzip stream" in r.json()["error"]
    assert infer(http, serving_default_server.url, z, **{"Content-Encoding": "gzip"}).status_code == 200


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


def test_a_binary_body_larger_than_its_header_and_the_largest_batch_is_413_unread(serving_default_server, http):
    x = np.zeros((8, 4, 4, 1), np.uint8)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [8, 4, 4, 1], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 128}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    url = f"{serving_default_server.url}/v2/models/tiny/infer"
    assert http.post(url, data=head + x.tobytes(), headers=headers, timeout=10).status_code == 200
    r = http.post(url, data=head + x.tobytes() + b"\0", headers=headers, timeout=10)
    assert r.status_code == 413, r.text
    assert f"at most {len(head) + 128} (a {len(head)}-byte JSON header" in r.json()["error"]


def test_the_body_limit_setting_is_named_when_it_is_the_smaller(tiny_onnx_model_dir, http):
    srv = serve(tiny_onnx_model_dir, config=AppConfig(max_body_bytes=500))
    try:
        r = infer(http, srv.url, good_json(8))
        assert r.status_code == 413 and "at most 500 (the body limit, NIGHTSHIFT_MAX_BODY_BYTES)" in r.json()["error"]
    finally:
        srv.shutdown()
        srv.server_close()
