"""The ASGI serving stack in process: OIP binary extension, batching, limits, metrics, request log, uploads."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests

from nightshift.serving.app import AppConfig
from nightshift.serving.batching import DynamicBatcher
from nightshift.serving.errors import Overloaded
from nightshift.serving.server import Model, make_server


@pytest.fixture
def http():
    with requests.Session() as s:
        s.trust_env = False
        yield s


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)


def _server(model_dir, **cfg):
    model = Model(model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    request_log = cfg.pop("request_log", None)
    return make_server(model, "127.0.0.1", 0, config=AppConfig(**cfg), request_log=request_log).start()


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


# ----------------------------------------------------------------------------- limits


def test_413_comes_from_the_headers_without_reading_the_body(serving_server):
    host, port = serving_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 67108864\r\n\r\n")  # 64 MiB announced, nothing sent
        t0 = time.perf_counter()
        answer = s.recv(65536).decode()
        assert time.perf_counter() - t0 < 2
    # the model's largest JSON request (8 images of 4x4x1 at 8 bytes a value + 64 KiB), not the 1 MiB body limit
    assert answer.startswith("HTTP/1.1 413") and "at most 66560" in answer and "NIGHTSHIFT_MAX_BATCH=8" in answer
    assert "connection: close" in answer.lower()


def test_slow_body_times_out_with_408(tiny_onnx_model_dir):
    srv = _server(tiny_onnx_model_dir, body_timeout_s=0.5)
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
    before = _metric(http, serving_server.url, "nightshift_client_disconnects_total")
    with caplog.at_level("WARNING"):
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        time.sleep(0.3)
    assert _metric(http, serving_server.url, "nightshift_client_disconnects_total") == before + 3
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert http.get(f"{serving_server.url}/v2/health/ready").status_code == 200


# ----------------------------------------------------------------------------- batching


def _slow_predict(delay_s: float, calls: list[int]):
    def predict(pixels):
        calls.append(len(pixels))
        time.sleep(delay_s)
        return {"logits": np.zeros((len(pixels), 3), np.float32) + pixels.reshape(len(pixels), -1)[:, :1]}

    return predict


def test_batcher_coalesces_and_splits_in_order():
    calls: list[int] = []
    b = DynamicBatcher(_slow_predict(0.05, calls), max_batch_size=8, max_queue_delay_ms=20).start()

    async def main():
        xs = [np.full((1, 2, 2, 1), i, np.uint8) for i in range(12)]
        return await asyncio.gather(*(b.submit(v) for v in xs))

    results = asyncio.run(main())
    b.stop()
    assert [int(r.outputs["logits"][0, 0]) for r in results] == list(range(12))  # each got its own row
    assert max(calls) > 1 and sum(calls) == 12 and max(calls) <= 8
    assert max(r.batch_size for r in results) == max(calls)


@pytest.mark.parametrize("instances", [1, 2])
def test_batcher_instances_run_batches_at_once(instances):
    """``instances`` workers run that many batches at the same time on one predict function:
    with two, two single-image batches meet inside predict (the barrier passes); with one
    they cannot, and the barrier's timeout fails them."""
    barrier = threading.Barrier(2, timeout=1.0)
    running, peak = [0], [0]
    lock = threading.Lock()

    def predict(pixels):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            barrier.wait()
        finally:
            with lock:
                running[0] -= 1
        return {"logits": np.zeros((len(pixels), 3), np.float32)}

    b = DynamicBatcher(predict, max_batch_size=1, instances=instances).start()

    async def main():
        return await asyncio.gather(*(b.submit(np.zeros((1, 2, 2, 1), np.uint8)) for _ in range(2)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    assert peak[0] == instances
    failed = [r for r in results if isinstance(r, Exception)]
    assert (not failed) if instances == 2 else (len(failed) >= 1)


def test_ort_layout_defaults_to_one_thread_per_instance_per_cpu():
    from nightshift.serving.server import ort_layout

    assert ort_layout(4) == (1, 4)
    assert ort_layout(4, threads=2) == (2, 2)
    assert ort_layout(4, threads=8) == (8, 1)
    assert ort_layout(4, instances=1) == (1, 1)
    assert ort_layout(0) == (1, 1)


def test_batcher_queue_full_is_overloaded():
    calls: list[int] = []
    b = DynamicBatcher(_slow_predict(0.2, calls), max_batch_size=1, max_queue_size=2).start()

    async def main():
        return await asyncio.gather(*(b.submit(np.zeros((1, 2, 2, 1), np.uint8)) for _ in range(6)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert rejected and all(r.retry_after_s >= 1 for r in rejected)
    assert len(results) - len(rejected) == len(calls) >= 2


def test_batcher_sheds_requests_that_would_wait_too_long():
    calls: list[int] = []
    b = DynamicBatcher(_slow_predict(0.1, calls), max_batch_size=1, max_queue_wait_ms=150).start()

    async def main():
        await b.submit(np.zeros((1, 2, 2, 1), np.uint8))  # teaches the batcher ~0.1 s per image
        return await asyncio.gather(*(b.submit(np.zeros((1, 2, 2, 1), np.uint8)) for _ in range(8)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    b.stop()
    shed = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert shed and served and len(shed) + len(served) == 8
    assert all(r.queue_s <= 0.15 + 0.05 for r in served)  # nobody waited much past the limit
    assert any("ms of work" in r.message or "waited" in r.message for r in shed)
    assert len(calls) == 1 + len(served)  # shed requests were never run
    assert b._running == 0  # dropped batches leave the running count as it was (inline path stays usable)


def test_batching_under_concurrency_and_503_with_retry_after(tiny_onnx_model_dir, http):
    srv = _server(tiny_onnx_model_dir, max_batch_size=8, max_queue_delay_ms=5, max_queue_size=4)
    real = srv.model.predict
    srv.model.predict = lambda p: (time.sleep(0.03), real(p))[1]  # a slower model, so a queue forms
    srv.app.batcher.predict = srv.model.predict
    try:
        body = {"inputs": [{"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8", "data": [1] * 16}]}
        statuses: list[int] = []
        retry_after: list[str] = []

        def client():
            with requests.Session() as s:
                s.trust_env = False
                for _ in range(5):
                    r = s.post(f"{srv.url}/v2/models/tiny/infer", json=body, timeout=10)
                    statuses.append(r.status_code)
                    if r.status_code == 503:
                        retry_after.append(r.headers.get("Retry-After"))

        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(statuses) == 60 and set(statuses) <= {200, 503}
        assert statuses.count(503) > 0 and all(v == "1" for v in retry_after)
        metrics = http.get(f"{srv.url}/metrics").text
        count = _metric_text(metrics, "nightshift_batch_size_count")
        total = _metric_text(metrics, "nightshift_batch_size_sum")
        assert total == statuses.count(200) and total / count > 1.5  # requests were coalesced
        assert _metric_text(metrics, 'nightshift_requests_total{code="503",method="POST",route="infer"}') == \
            statuses.count(503)
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- metrics


def _metric_text(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (("{" in name) and line.startswith(name)):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _metric(http, url: str, name: str) -> float:
    return _metric_text(http.get(f"{url}/metrics").text, name)


def test_metrics_count_routes_codes_and_stages(serving_server, http, x):
    url = serving_server.url
    ok_before = _metric(http, url, 'nightshift_requests_total{code="200",method="POST",route="infer"}')
    bad_before = _metric(http, url, 'nightshift_request_errors_total{code="400",route="infer"}')
    nf_before = _metric(http, url, 'nightshift_request_errors_total{code="404",route="unknown"}')
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    assert http.post(f"{url}/v2/models/tiny/infer", json=body).status_code == 200
    assert http.post(f"{url}/v2/models/tiny/infer", json={"inputs": []}).status_code == 400
    assert http.get(f"{url}/nope").status_code == 404
    r = http.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.text
    assert _metric_text(text, 'nightshift_requests_total{code="200",method="POST",route="infer"}') == ok_before + 1
    assert _metric_text(text, 'nightshift_request_errors_total{code="400",route="infer"}') == bad_before + 1
    assert _metric_text(text, 'nightshift_request_errors_total{code="404",route="unknown"}') == nf_before + 1
    for stage in ("preprocess", "queue", "inference", "serialization"):
        assert _metric_text(text, f'nightshift_stage_duration_seconds_count{{stage="{stage}"}}') >= 1, stage
    assert "nightshift_queue_depth 0.0" in text and "nightshift_model_ready 1.0" in text


# ----------------------------------------------------------------------------- request log and uploads


def test_request_log_records_match_the_training_profile(tiny_onnx_model_dir, tmp_path, x, tiny_onnx_forward):
    from nightshift.data.decode import image_stats
    from nightshift.serving.requestlog import SCHEMA, RequestLog

    rl = RequestLog(tmp_path / "log", sample_rate=1.0, rotate_s=60)
    srv = _server(tiny_onnx_model_dir, request_log=rl)
    try:
        body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                            "data": x.ravel().tolist()}]}
        assert requests.post(f"{srv.url}/v2/models/tiny/infer", json=body, timeout=5).status_code == 200
    finally:
        srv.shutdown()  # drains, then closes the log: the open file is published
        srv.server_close()
    assert not list((tmp_path / "log").glob("*.part"))
    files = list((tmp_path / "log").glob("requests-*.jsonl"))
    assert len(files) == 1
    recs = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(recs) == 3
    stats = image_stats(x)
    logits, emb = tiny_onnx_forward(x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i, rec in enumerate(recs):
        assert rec["schema"] == SCHEMA and rec["model_name"] == "tiny" and rec["model_version"] == "1"
        assert rec["timestamp"].endswith("Z") and rec["endpoint"] == "infer"
        assert (rec["height"], rec["width"], rec["channels"]) == (4, 4, 1)
        assert rec["brightness"] == pytest.approx(stats["brightness"][i])
        assert rec["contrast"] == pytest.approx(stats["contrast"][i])
        assert rec["mean_ch0"] == pytest.approx(stats["mean_ch0"][i])
        assert rec["sha256"] == stats["sha256"][i]
        assert rec["predicted_index"] == int(logits[i].argmax())
        assert rec["predicted_class"] == ["zero", "one", "two"][rec["predicted_index"]]
        assert rec["confidence"] == pytest.approx(p[i].max(), rel=1e-5)
        np.testing.assert_allclose(rec["embedding"], emb[i], rtol=1e-5, atol=1e-6)


def test_request_log_never_blocks_and_counts_drops(tmp_path):
    from nightshift.serving.requestlog import RequestLog

    rl = RequestLog(tmp_path, sample_rate=1.0, queue_size=1)
    rl._write = lambda text: time.sleep(0.3)  # a slow disk
    t0 = time.perf_counter()
    results = [rl.submit(np.zeros((1, 2, 2, 1), np.uint8), {"logits": np.zeros((1, 3), np.float32)},
                         model_name="m", model_version="1", class_names=["a", "b", "c"], endpoint="infer")
               for _ in range(50)]
    assert time.perf_counter() - t0 < 0.1
    assert results.count(False) == rl.dropped > 0
    rl.close()


def test_request_log_publishes_a_killed_servers_files_but_not_a_live_ones(tmp_path):
    from nightshift.serving.requestlog import RequestLog

    sample = (np.zeros((1, 2, 2, 1), np.uint8), {"logits": np.zeros((1, 3), np.float32)})
    meta = {"model_name": "m", "model_version": "1", "class_names": ["a", "b", "c"], "endpoint": "infer"}
    live = RequestLog(tmp_path, sample_rate=1.0, rotate_s=3600)
    assert live.submit(*sample, **meta)
    deadline = time.monotonic() + 5
    while live.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    (live_part,) = tmp_path.glob("requests-*.jsonl.part")
    # what a SIGKILLed server leaves: a .part file nobody holds, its last line cut short
    dead = tmp_path / "requests-20260101T000000-deadhost-7-abc123-00001.jsonl.part"
    dead.write_text('{"schema":"nightshift.request_log/1","n":1}\n{"schema":"nightshift.req')
    (tmp_path / "requests-20260101T000000-deadhost-7-abc123-00002.jsonl.part").write_text('{"cut')  # no full line

    restarted = RequestLog(tmp_path, sample_rate=1.0)

    assert [p.name for p in restarted.recovered] == [dead.name[:-len(".part")]]
    assert (tmp_path / dead.name[:-len(".part")]).read_text() == '{"schema":"nightshift.request_log/1","n":1}\n'
    assert not (tmp_path / "requests-20260101T000000-deadhost-7-abc123-00002.jsonl.part").exists()
    assert live_part.exists()  # the running server's file is left to it
    live.close()
    restarted.close()
    assert not list(tmp_path.glob("*.part"))
    records = [json.loads(line) for f in tmp_path.glob("requests-*.jsonl") for line in f.read_text().splitlines()]
    assert sum(r.get("model_name") == "m" for r in records) == 1


def test_request_log_sampling_rate():
    from nightshift.serving.requestlog import RequestLog
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rl = RequestLog(d, sample_rate=0.1, seed=3)
        hits = sum(rl.sampled() for _ in range(5000))
        rl.close()
    assert 350 < hits < 650
    with pytest.raises(ValueError, match="within 0..1"):
        RequestLog(tempfile.gettempdir(), sample_rate=2)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format=fmt)
    return buf.getvalue()


def test_classify_upload_matches_the_collection_decoder(serving_server, http, tiny_onnx_forward):
    from nightshift.data.decode import decode_image, to_shape

    img = np.random.default_rng(5).integers(0, 256, (9, 7, 3), dtype=np.uint8)  # other size, RGB
    data = _png(img)
    expected_pixels = to_shape(decode_image(data), (4, 4, 1))[None]
    logits, _ = tiny_onnx_forward(expected_pixels)
    r = http.post(f"{serving_server.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["class"] == ["zero", "one", "two"][int(logits[0].argmax())]
    assert sum(ans["probabilities"].values()) == pytest.approx(1.0)
    assert ans["input_size"] == {"height": 9, "width": 7, "channels": 3}
    jpeg = _png(img, "JPEG")
    assert http.post(f"{serving_server.url}/v2/models/tiny/versions/1/classify", data=jpeg,
                     headers={"Content-Type": "image/jpeg"}).status_code == 200


@pytest.mark.parametrize(
    ("data", "ctype", "status", "needle"),
    [
        pytest.param(b"GIF89a....", "image/png", 415, "not a PNG or JPEG", id="gif"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "image/png", 400, "could not decode", id="corrupt-png"),
        pytest.param(b"--x\r\n", "multipart/form-data; boundary=x", 415, "not a form", id="multipart"),
        pytest.param(b"{}", "application/json", 415, "image/png or image/jpeg", id="json"),
    ],
)
def test_classify_rejects_bad_uploads(serving_server, http, data, ctype, status, needle):
    r = http.post(f"{serving_server.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_model_uri_tarball(tiny_onnx_model_dir, tmp_path):
    import tarfile

    from nightshift.serving.errors import ModelLoadError
    from nightshift.serving.server import resolve_model_uri

    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_onnx_model_dir, arcname="tiny")
    d = resolve_model_uri(archive.as_uri(), workdir=tmp_path)
    assert (d / "model.onnx").is_file() and Model(d).load()
    assert resolve_model_uri(str(tiny_onnx_model_dir)) == tiny_onnx_model_dir
    with pytest.raises(ModelLoadError, match="scheme 's3' is not supported"):
        resolve_model_uri("s3://bucket/m.tar.gz")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_uri(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- the probabilities output


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_asks_for_probabilities(tiny_onnx_factory, tiny_onnx_forward, x, binary):
    import tritonclient.http as th

    srv = _server(tiny_onnx_factory("probs", probabilities=True))
    try:
        client = th.InferenceServerClient(srv.url.removeprefix("http://"))
        meta = client.get_model_metadata("tiny")
        assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "embedding", "label"]
        inp = th.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        r = client.infer("tiny", [inp], outputs=[th.InferRequestedOutput("probabilities", binary_data=binary)])
        assert [o["name"] for o in r.get_response()["outputs"]] == ["probabilities"]
        logits, _ = tiny_onnx_forward(x)
        ref = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(r.as_numpy("probabilities"), ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
        r = client.infer("tiny", [inp])  # no outputs named: all four
        assert {o["name"] for o in r.get_response()["outputs"]} == {"logits", "probabilities", "embedding", "label"}
    finally:
        srv.shutdown()
        srv.server_close()


def test_request_log_confidence_comes_from_the_probabilities_output():
    from nightshift.serving.requestlog import build_records

    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
    kw = dict(model_name="m", model_version="1", class_names=["a", "b", "c"], endpoint="infer", timestamp=0.0)
    pixels = np.zeros((2, 2, 2, 1), np.uint8)
    # the model's own probabilities are what the log records (here deliberately not softmax(logits))
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], np.float32)
    recs = build_records(pixels, {"logits": logits, "probabilities": probs}, **kw)
    assert [r["predicted_class"] for r in recs] == ["a", "c"]
    assert [r["confidence"] for r in recs] == pytest.approx([0.5, 0.8])
    # a model without the output: softmax of the logits, as before
    recs = build_records(pixels, {"logits": logits}, **kw)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert [r["confidence"] for r in recs] == pytest.approx(p.max(1).tolist())


def test_classify_answers_with_the_models_probabilities(tiny_onnx_factory, tiny_onnx_forward, http):
    from nightshift.data.decode import decode_image, to_shape

    srv = _server(tiny_onnx_factory("probs", probabilities=True))
    try:
        img = np.random.default_rng(8).integers(0, 256, (4, 4, 1), dtype=np.uint8)
        data = _png(img)
        logits, _ = tiny_onnx_forward(to_shape(decode_image(data), (4, 4, 1))[None])
        r = http.post(f"{srv.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        ans = r.json()
        ref = np.exp(logits[0] - logits[0].max())
        ref /= ref.sum()
        assert ans["class"] == ["zero", "one", "two"][int(logits[0].argmax())]
        assert list(ans["probabilities"].values()) == pytest.approx(ref.tolist(), rel=1e-5)
        assert ans["confidence"] == pytest.approx(float(ref.max()), rel=1e-5)
    finally:
        srv.shutdown()
        srv.server_close()
