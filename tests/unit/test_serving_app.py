"""The ASGI app (:mod:`nightshift.serving.app`) over HTTP: routes, metadata, readiness,
status codes for bad requests, body limits and timeouts, and the batcher's 503s."""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import threading
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from nightshift.serving.app import AppConfig
from nightshift.serving.server import TIMING_HEADER, Model, make_server
from tests.unit.serving_support import infer_body, metric, metric_text, serve, wait_for


def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """Send a hand-made request (for missing/oversized Content-Length) and read the JSON answer."""
    u = urlsplit(url)
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# ----------------------------------------------------------------------------- endpoints


def test_health_and_metadata(serving_server, http, tiny_onnx_spec):
    url = serving_server.url
    assert http.get(f"{url}/v2/health/live").json() == {"live": True}
    r = http.get(f"{url}/v2/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert http.get(f"{url}/v2").json()["name"] == "nightshift-serving"

    meta = http.get(f"{url}/v2/models/tiny").json()
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 4, 4, 1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"logits": [-1, 3], "embedding": [-1, 8], "label": [-1]}
    assert meta["parameters"]["class_names"] == tiny_onnx_spec["class_names"]

    r = http.get(f"{url}/v2/models/tiny/ready")
    assert r.status_code == 200 and r.json() == {"name": "tiny", "ready": True}
    assert http.get(f"{url}/v2/models/tiny/versions/1/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/other", "/v2/models/other/ready", "/v2/models/tiny/versions/9/ready"])
def test_unknown_model_or_version_is_404(serving_server, http, path):
    r = http.get(serving_server.url + path)
    assert r.status_code == 404
    assert "tiny" in r.json()["error"]


def test_unknown_route_and_wrong_method(serving_server, http):
    r = http.get(serving_server.url + "/v1/models/tiny")
    assert r.status_code == 404 and "no endpoint" in r.json()["error"]
    r = http.get(serving_server.url + "/v2/models/tiny/infer")
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["Allow"] == "POST"
    r = http.post(serving_server.url + "/v2/health/ready", data=b"{}")
    assert r.status_code == 405


def test_infer_matches_numpy(serving_server, http, pixels, tiny_onnx_forward, tiny_onnx_spec):
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", json=infer_body(pixels, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert set(out) == {"logits", "embedding", "label"}
    ref_logits, ref_emb = tiny_onnx_forward(pixels)

    assert out["logits"]["shape"] == [5, 3] and out["logits"]["datatype"] == "FP32"
    logits = np.asarray(out["logits"]["data"], dtype=np.float32).reshape(5, 3)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert out["embedding"]["shape"] == [5, 8] and out["embedding"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.asarray(out["embedding"]["data"]).reshape(5, 8), ref_emb, rtol=1e-5, atol=1e-5)
    assert out["label"] == {"name": "label", "shape": [5], "datatype": "BYTES",
                            "data": [tiny_onnx_spec["class_names"][i] for i in ref_logits.argmax(axis=1)]}
    assert float(r.headers[TIMING_HEADER]) >= 0


def test_infer_with_version_path_nested_data_and_output_subset(serving_server, http, pixels, tiny_onnx_forward):
    body = infer_body(pixels, outputs=[{"name": "label"}])
    body["inputs"][0]["data"] = pixels.tolist()  # nested form is accepted too
    r = http.post(f"{serving_server.url}/v2/models/tiny/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["label"]
    ref_logits, _ = tiny_onnx_forward(pixels)
    assert outs[0]["data"] == [["zero", "one", "two"][i] for i in ref_logits.argmax(axis=1)]


# ----------------------------------------------------------------------------- bad input


GOOD = {"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8", "data": [0] * 16}


def _with(**changes) -> bytes:
    return json.dumps({"inputs": [{**GOOD, **changes}]}).encode()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        pytest.param(b"{not json", 400, "not valid JSON", id="malformed-json"),
        pytest.param(b"\xff\xfe", 400, "not UTF-8", id="not-utf8"),
        pytest.param(b"[1, 2]", 400, "JSON object", id="not-an-object"),
        pytest.param(b"{}", 400, "no 'inputs'", id="missing-inputs"),
        pytest.param(b'{"inputs": []}', 400, "non-empty list", id="empty-inputs"),
        pytest.param(json.dumps({"inputs": [GOOD, GOOD]}).encode(), 400, "exactly one", id="two-inputs"),
        pytest.param(_with(name="image"), 400, "'image'", id="wrong-input-name"),
        pytest.param(_with(datatype="FP32"), 400, "datatype is 'FP32'", id="wrong-datatype"),
        pytest.param(_with(shape=[1, 4, 4, 3], data=[0] * 48), 400, "expected [n, 4, 4, 1]", id="wrong-shape"),
        pytest.param(_with(shape=[16]), 400, "expected [n, 4, 4, 1]", id="wrong-rank"),
        pytest.param(_with(shape="1x4x4x1"), 400, "list of integers", id="shape-not-list"),
        pytest.param(_with(shape=[0, 4, 4, 1], data=[]), 400, "batch size 0", id="empty-batch"),
        pytest.param(_with(data=[0] * 15), 400, "has 15 values but shape [1, 4, 4, 1] needs 16", id="short-data"),
        pytest.param(_with(data=[0] * 17), 400, "has 17 values", id="long-data"),
        pytest.param(_with(data=[0] * 15 + [256]), 400, "data[15] = 256 is outside 0..255", id="value-too-big"),
        pytest.param(_with(data=[-1] + [0] * 15), 400, "data[0] = -1 is outside 0..255", id="value-negative"),
        pytest.param(_with(data=[0.5] * 16), 400, "non-integer numbers", id="float-values"),
        pytest.param(_with(data=["a"] * 16), 400, "strings", id="string-values"),
        pytest.param(_with(data=[[0, 1], [2]]), 400, "ragged", id="ragged-nested"),
        pytest.param(_with(data="AAAA"), 400, "must be a list", id="data-not-list"),
        pytest.param(_with(shape=[9, 4, 4, 1], data=[0] * 144), 413, "exceeds this server's maximum of 8",
                     id="batch-too-large"),
        pytest.param(json.dumps({"inputs": [GOOD], "outputs": [{"name": "probs"}]}).encode(), 400,
                     "'probs' is not an output", id="unknown-output"),
    ],
)
def test_bad_input(serving_server, http, body, status, needle):
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", data=body,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert needle in r.json()["error"]


def test_infer_unknown_model_is_404(serving_server, http):
    r = http.post(f"{serving_server.url}/v2/models/nope/infer", data=_with())
    assert r.status_code == 404 and "'nope'" in r.json()["error"]


def test_errors_before_reading_the_body_keep_the_connection_usable(serving_server, http, pixels):
    # the body of a refused request must not leak into the next request on the same connection
    url = serving_server.url
    for _ in range(2):
        assert http.post(f"{url}/v2/models/nope/infer", json=infer_body(pixels)).status_code == 404
        assert http.post(f"{url}/v2/health/ready", json=infer_body(pixels)).status_code == 405
        assert http.post(f"{url}/v2/models/tiny/infer", json=infer_body(pixels)).status_code == 200


# ----------------------------------------------------------------------------- body limits and timeouts


def test_body_too_large_is_413_without_reading_it(serving_server):
    status, body = _raw(serving_server.url, "POST", "/v2/models/tiny/infer",
                        {"Content-Type": "application/json", "Content-Length": str(2 << 20)})
    assert status == 413
    assert "at most 66560" in body["error"]  # what the largest batch can need as JSON, under the 1 MiB body limit


def test_missing_content_length_is_411(serving_server):
    status, body = _raw(serving_server.url, "POST", "/v2/models/tiny/infer", {"Content-Type": "application/json"})
    assert status == 411 and "Content-Length" in body["error"]


def test_bad_content_length_and_type(serving_server, http):
    # an unparsable Content-Length is refused by the HTTP parser itself
    u = urlsplit(serving_server.url)
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.putrequest("POST", "/v2/models/tiny/infer", skip_accept_encoding=True)
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    assert conn.getresponse().status == 400
    conn.close()
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", data=_with(), headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "image/png" in r.json()["error"]
    assert http.get(f"{serving_server.url}/v2/health/live").status_code == 200  # still serving


def test_413_comes_from_the_headers_without_reading_the_body(serving_server):
    host, port = serving_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 67108864\r\n\r\n")  # 64 MiB announced, nothing sent
        # answered with nothing of the body sent: a server that waited for it would answer
        # only at its 30 s body timeout, and this recv gives up (socket.timeout) after 5 s
        answer = s.recv(65536).decode()
    # the model's largest JSON request (8 images of 4x4x1 at 8 bytes a value + 64 KiB), not the 1 MiB body limit
    assert answer.startswith("HTTP/1.1 413") and "at most 66560" in answer and "NIGHTSHIFT_MAX_BATCH=8" in answer
    assert "connection: close" in answer.lower()


def test_slow_body_times_out_with_408(tiny_onnx_model_dir):
    srv = serve(tiny_onnx_model_dir, config=AppConfig(body_timeout_s=0.5))
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"in")
            answer = s.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within" in answer
        assert requests.get(f"{srv.url}/v2/health/live", timeout=5).status_code == 200  # still serving
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_hang_up_is_not_an_error(serving_server, http, caplog):
    host, port = serving_server.url.removeprefix("http://").split(":")
    before = metric(http, serving_server.url, "nightshift_client_disconnects_total")
    with caplog.at_level("WARNING"):
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        # the server notices a hang-up when it next reads: wait for it (the deadline only bounds a hang)
        wait_for(lambda: metric(http, serving_server.url, "nightshift_client_disconnects_total") >= before + 3,
                 what="the server to count the three hang-ups")
    assert metric(http, serving_server.url, "nightshift_client_disconnects_total") == before + 3
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert http.get(f"{serving_server.url}/v2/health/ready").status_code == 200


# ----------------------------------------------------------------------------- readiness


def test_not_ready_is_503(tiny_onnx_model_dir, pixels):
    model = Model(tiny_onnx_model_dir)  # constructed, never loaded
    assert model.name == "tiny" and not model.ready
    server = make_server(model, "127.0.0.1", 0).start()
    try:
        with requests.Session() as s:
            s.trust_env = False
            assert s.get(f"{server.url}/v2/health/live").status_code == 200
            r = s.get(f"{server.url}/v2/health/ready")
            assert r.status_code == 503 and "not ready" in r.json()["error"]
            assert s.get(f"{server.url}/v2/models/tiny/ready").status_code == 503
            assert s.get(f"{server.url}/v2/models/tiny").status_code == 503
            r = s.post(f"{server.url}/v2/models/tiny/infer", json=infer_body(pixels))
            assert r.status_code == 503 and "still loading" in r.json()["error"]
            model.load()
            assert s.get(f"{server.url}/v2/health/ready").status_code == 200
            assert s.post(f"{server.url}/v2/models/tiny/infer", json=infer_body(pixels)).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- the batcher behind the app


def test_batching_under_concurrency_and_503_with_retry_after(tiny_onnx_model_dir, http):
    srv = serve(tiny_onnx_model_dir, config=AppConfig(max_batch_size=8, max_queue_delay_ms=5, max_queue_size=4))
    batcher, real = srv.app.batcher, srv.model.predict
    in_flight = [0]  # requests the clients have sent and not yet had answered
    lock = threading.Lock()

    def held(p):
        # A slow model made of events, not time: a batch a worker runs returns only once every
        # other request the clients have out waits in the queue. A queue forms (and, with 12
        # clients and room for 4, overflows) however fast the machine is. A request the event
        # loop runs inline (a lone client) is not held: the loop must keep taking requests.
        if threading.current_thread().name.startswith("batcher-"):
            wait_for(lambda: batcher.depth + len(p) >= in_flight[0], what="the other requests to queue",
                     every_s=0.001)
        return real(p)

    srv.model.predict = batcher.predict = held
    try:
        body = {"inputs": [{"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8", "data": [1] * 16}]}
        statuses: list[int] = []
        retry_after: list[str] = []

        together = threading.Barrier(12, timeout=60)  # the clients start at once, not one by one

        def client():
            with requests.Session() as s:
                s.trust_env = False
                together.wait()
                for _ in range(5):
                    with lock:
                        in_flight[0] += 1
                    try:
                        r = s.post(f"{srv.url}/v2/models/tiny/infer", json=body, timeout=60)
                    finally:
                        with lock:
                            in_flight[0] -= 1
                    statuses.append(r.status_code)
                    if r.status_code == 503:
                        retry_after.append(r.headers.get("Retry-After"))

        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(statuses) == 60 and set(statuses) <= {200, 503}
        assert statuses.count(503) > 0 and all(v == "1" for v in retry_after)
        metrics = http.get(f"{srv.url}/metrics").text
        count = metric_text(metrics, "nightshift_batch_size_count")
        total = metric_text(metrics, "nightshift_batch_size_sum")
        assert total == statuses.count(200) and total / count > 1.5  # requests were coalesced
        assert metric_text(metrics, 'nightshift_requests_total{code="503",method="POST",route="infer"}') == \
            statuses.count(503)
    finally:
        srv.shutdown()
        srv.server_close()
