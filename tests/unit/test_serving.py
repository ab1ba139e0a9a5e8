"""The OIP (KServe v2) server, in-process on 127.0.0.1 with a tiny real ONNX model."""

from __future__ import annotations

import http.client as httpclient
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from nightshift.serving.server import TIMING_HEADER, Model, ModelLoadError, make_server

SERVING_DIR = Path(__file__).resolve().parents[2] / "plugins" / "nightshift" / "serving"


def _infer_body(pixels: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                        "data": pixels.reshape(-1).tolist()}], **extra}


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)


@pytest.fixture
def http():
    with requests.Session() as s:
        s.trust_env = False
        yield s


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
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer", json=_infer_body(pixels, id="req-1"))
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
    body = _infer_body(pixels, outputs=[{"name": "label"}])
    body["inputs"][0]["data"] = pixels.tolist()  # nested form is accepted too
    r = http.post(f"{serving_server.url}/v2/models/tiny/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["label"]
    ref_logits, _ = tiny_onnx_forward(pixels)
    assert outs[0]["data"] == [["zero", "one", "two"][i] for i in ref_logits.argmax(axis=1)]


def test_keep_alive_and_concurrency(serving_server, pixels, tiny_onnx_forward):
    """8 clients x 10 requests on keep-alive connections: every answer is 200 and right.

    Each worker records its own outcome; a worker that raised, hung or got a
    wrong answer fails the test (nothing is read before the status is checked).
    """
    expected = tiny_onnx_forward(pixels)[0].argmax(axis=1).tolist()
    n_workers, n_requests = 8, 10
    results: dict[int, list[str]] = {}

    def worker(i: int) -> None:
        outcome: list[str] = []
        try:
            with requests.Session() as s:
                s.trust_env = False
                for _ in range(n_requests):
                    r = s.post(f"{serving_server.url}/v2/models/tiny/infer", json=_infer_body(pixels), timeout=10)
                    if r.status_code != 200:
                        outcome.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    got = np.asarray(r.json()["outputs"][0]["data"]).reshape(5, 3).argmax(1).tolist()
                    outcome.append("ok" if got == expected else f"wrong answer {got} != {expected}")
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome.append(f"{type(exc).__name__}: {exc}")
        results[i] = outcome

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert sorted(results) == list(range(n_workers))
    problems = [o for out in results.values() for o in out if o != "ok"]
    assert problems == []
    assert sum(len(o) for o in results.values()) == n_workers * n_requests


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
        assert http.post(f"{url}/v2/models/nope/infer", json=_infer_body(pixels)).status_code == 404
        assert http.post(f"{url}/v2/health/ready", json=_infer_body(pixels)).status_code == 405
        assert http.post(f"{url}/v2/models/tiny/infer", json=_infer_body(pixels)).status_code == 200


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


# ----------------------------------------------------------------------------- readiness and loading


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
            r = s.post(f"{server.url}/v2/models/tiny/infer", json=_infer_body(pixels))
            assert r.status_code == 503 and "still loading" in r.json()["error"]
            model.load()
            assert s.get(f"{server.url}/v2/health/ready").status_code == 200
            assert s.post(f"{server.url}/v2/models/tiny/infer", json=_infer_body(pixels)).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


def test_load_errors_name_the_problem(tmp_path, tiny_onnx_factory):
    with pytest.raises(ModelLoadError, match="model.json does not exist"):
        Model(tmp_path / "nowhere").load()

    d = tiny_onnx_factory("badname")
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "input_name": "image"}))
    m = Model(d)
    with pytest.raises(ModelLoadError, match="input_name 'image' does not match the ONNX graph's input 'pixels'"):
        m.load()
    assert not m.ready and "input_name" in m.load_error

    (d / "model.json").write_text(json.dumps({**meta, "input_shape": [8, 8, 1]}))
    with pytest.raises(ModelLoadError, match=r"input_shape \[8, 8, 1\] disagrees"):
        Model(d).load()
    (d / "model.json").write_text(json.dumps({**meta, "class_names": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match="2 class_names but the model's logits have 3"):
        Model(d).load()
    (d / "model.onnx").write_bytes(b"not onnx")
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="could not load model"):
        Model(d).load()


# ----------------------------------------------------------------------------- as a process


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_") and k != "PYTHONPATH"}
    env.update(kw)
    return env


def test_runs_as_module_logs_json_and_drains_on_sigterm(tiny_onnx_model_dir, pixels):
    from nightshift.evaluation import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server"], cwd=SERVING_DIR.parent, stderr=subprocess.PIPE, text=True,
        env=_env(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(port), NIGHTSHIFT_ORT_THREADS="1",
                 NIGHTSHIFT_LOG_LEVEL="INFO", NIGHTSHIFT_ACCESS_LOG_SAMPLE="1"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        assert requests.post(f"{url}/v2/models/tiny/infer", json=_infer_body(pixels), timeout=5).status_code == 200
        # a request in flight (half its body sent) when SIGTERM arrives is still answered
        body = json.dumps(_infer_body(pixels)).encode()
        conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/v2/models/tiny/infer", skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:10])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        conn.send(body[10:])
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["model_name"] == "tiny"
        conn.close()
        assert proc.wait(10) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        access = [x for x in lines if x["logger"] == "nightshift.serving.access"]
        assert any(a["route"] == "infer" and a["status"] == 200 and a["duration_ms"] > 0 for a in access), lines
        assert any(x["message"] == "server stopped" for x in lines)
        assert not [x for x in lines if x["level"] == "ERROR"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runs_as_script_and_exits_1_when_model_missing(tmp_path):
    from nightshift.evaluation import free_port

    proc = subprocess.run(
        [sys.executable, str(SERVING_DIR / "server.py")], cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env=_env(NIGHTSHIFT_MODEL_DIR=str(tmp_path / "missing"), NIGHTSHIFT_PORT=str(free_port())),
    )
    assert proc.returncode == 1
    assert "model failed to load" in proc.stderr and "missing/model.json does not exist" in proc.stderr


# ----------------------------------------------------------------------------- the probabilities output


def test_model_with_probabilities_lists_and_serves_all_outputs(tiny_onnx_factory, tiny_onnx_forward):
    model = Model(tiny_onnx_factory("probs", probabilities=True), max_batch=8)
    model.load()
    meta = model.metadata()
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 3]), ("probabilities", "FP32", [-1, 3]), ("embedding", "FP32", [-1, 8]),
        ("label", "BYTES", [-1])]
    pixels = np.random.default_rng(3).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    logits, _ = tiny_onnx_forward(pixels)
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    server = make_server(model, "127.0.0.1", 0).start()
    try:
        with requests.Session() as s:
            s.trust_env = False
            url = f"{server.url}/v2/models/{model.name}/infer"
            # no outputs named: all of them, in graph order, then label
            out = s.post(url, json=_infer_body(pixels)).json()["outputs"]
            assert [o["name"] for o in out] == ["logits", "probabilities", "embedding", "label"]
            # only some, in request order
            out = s.post(url, json=_infer_body(pixels, outputs=[{"name": "label"}, {"name": "probabilities"}])
                         ).json()["outputs"]
            assert [o["name"] for o in out] == ["label", "probabilities"]
    finally:
        server.shutdown()
        server.server_close()
    probs = np.asarray(out[1]["data"], dtype=np.float32).reshape(out[1]["shape"])
    assert out[1]["shape"] == [5, 3] and out[1]["datatype"] == "FP32"
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    assert out[0]["data"] == [["zero", "one", "two"][i] for i in probs.argmax(1)]


def test_old_model_without_probabilities_still_serves_and_says_what_it_has(serving_server, http):
    assert "probabilities" not in serving_server.model.output_names
    pixels = np.zeros((1, 4, 4, 1), np.uint8)
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer",
                  json=_infer_body(pixels, outputs=[{"name": "probabilities"}]))
    assert r.status_code == 400
    assert "'probabilities' is not an output of this model" in r.json()["error"]
    assert "['logits', 'embedding', 'label']" in r.json()["error"]


def test_model_json_listing_outputs_the_graph_lacks_is_a_load_error(tiny_onnx_factory):
    d = tiny_onnx_factory("lying")
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "outputs": ["logits", "probabilities", "embedding"]}))
    with pytest.raises(ModelLoadError, match=r"lists outputs \['probabilities'\] that the ONNX graph does not have"):
        Model(d).load()
