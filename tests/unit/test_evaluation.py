"""evaluate_endpoint against the in-process server, and InferenceContainer with the real image."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from nightshift.containers import free_port
from nightshift.errors import DataError, ServingError
from nightshift.evaluation import InferenceContainer, evaluate_endpoint


@pytest.fixture
def serving_eval_set(tiny_onnx_forward):
    """20 random 4x4x1 images; labels are the model's predictions except the first 5 (shifted), so accuracy is 0.75."""
    images = np.random.default_rng(3).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    pred = tiny_onnx_forward(images)[0].argmax(axis=1)
    labels = pred.copy()
    labels[:5] = (labels[:5] + 1) % 3
    return images, labels.astype(np.int64)


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_accuracy_and_latency(serving_server, serving_eval_set, batch_size):
    images, labels = serving_eval_set
    res = evaluate_endpoint(serving_server.url, "tiny", images, labels, batch_size=batch_size)
    assert res["n"] == 20 and res["errors"] == 0 and res["error_samples"] == []
    assert res["requests"] == -(-20 // batch_size)
    assert res["answered"] == 20 and res["correct"] == 15
    assert res["accuracy"] == pytest.approx(0.75) and res["accuracy_all"] == pytest.approx(0.75)
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
    assert res["throughput_ips"] > 0 and res["wall_s"] > 0


def test_no_nagle_delay(serving_server, serving_eval_set):
    # headers and body go out as two writes; without TCP_NODELAY each request waits ~40 ms for a delayed ACK
    images, labels = serving_eval_set
    res = evaluate_endpoint(serving_server.url, "tiny", images, labels, batch_size=1)
    assert res["latency_ms"]["p50"] < 30, res["latency_ms"]


def test_label_output_only_needs_class_names(serving_server, serving_eval_set, monkeypatch, tiny_onnx_spec):
    # a server that answers only 'label' (no logits) is scored through class_names
    import nightshift.evaluation as ev

    real = ev._payload
    monkeypatch.setattr(ev, "_payload", lambda batch, name: json.dumps(
        {**json.loads(real(batch, name)), "outputs": [{"name": "label"}]}).encode())
    images, labels = serving_eval_set
    res = evaluate_endpoint(serving_server.url, "tiny", images, labels, batch_size=4,
                            class_names=tiny_onnx_spec["class_names"])
    assert res["errors"] == 0 and res["accuracy"] == pytest.approx(0.75)
    res = evaluate_endpoint(serving_server.url, "tiny", images, labels, batch_size=4)  # no class names
    assert res["errors"] == 5 and "neither 'logits' nor" in res["error_samples"][0]


def test_wrong_shape_is_counted_not_raised(serving_server):
    images = np.zeros((6, 5, 5, 1), dtype=np.uint8)  # the model wants 4x4x1
    res = evaluate_endpoint(serving_server.url, "tiny", images, np.zeros(6, dtype=np.int64), batch_size=2)
    assert res["requests"] == 3 and res["errors"] == 3 and res["errored_images"] == 6
    assert res["answered"] == 0 and res["accuracy"] is None and res["accuracy_all"] == 0.0
    assert res["latency_ms"]["p50"] is None
    assert len(res["error_samples"]) == 3
    assert "HTTP 400" in res["error_samples"][0] and "expected [n, 4, 4, 1]" in res["error_samples"][0]


def test_some_batches_fail(serving_server, serving_eval_set):
    # batches larger than the server's max (8) get 413; the rest are scored
    images, labels = serving_eval_set
    res = evaluate_endpoint(serving_server.url, "tiny", images, labels, batch_size=9, max_error_samples=1)
    assert res["requests"] == 3 and res["errors"] == 2 and res["errored_images"] == 18
    assert res["answered"] == 2 and len(res["error_samples"]) == 1 and "HTTP 413" in res["error_samples"][0]
    assert res["accuracy_all"] == pytest.approx(res["correct"] / 20)


def test_unknown_model_and_unreachable_server(serving_server, serving_eval_set):
    images, labels = serving_eval_set
    res = evaluate_endpoint(serving_server.url, "nope", images[:3], labels[:3])
    assert res["errors"] == 3 and "HTTP 404" in res["error_samples"][0]
    res = evaluate_endpoint(f"http://127.0.0.1:{free_port()}", "tiny", images[:2], labels[:2], timeout_s=2)
    assert res["errors"] == 2 and "ConnectionError" in res["error_samples"][0]


class _Garbage(BaseHTTPRequestHandler):
    answers = [b"not json", b'{"outputs": 3}', b'{"outputs": [{"name": "logits", "shape": [7, 3], "data": []}]}']

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = self.answers[self.server.calls % len(self.answers)]
        self.server.calls += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_malformed_answers_are_counted():
    server = HTTPServer(("127.0.0.1", 0), _Garbage)
    server.calls = 0
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        res = evaluate_endpoint(f"http://127.0.0.1:{server.server_address[1]}", "m",
                                np.zeros((3, 4, 4, 1), np.uint8), np.zeros(3, np.int64), warmup=0)
    finally:
        server.shutdown()
        server.server_close()
    assert res["errors"] == 3 and res["answered"] == 0
    samples = " | ".join(res["error_samples"])
    assert "malformed response" in samples and "no 'outputs' list" in samples and "logits shape is [7, 3]" in samples


def test_bad_arguments():
    with pytest.raises(DataError, match="uint8"):
        evaluate_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels must have shape \(2,\)"):
        evaluate_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(DataError, match="batch_size"):
        evaluate_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64),
                          batch_size=0)


def test_stop_before_start_is_a_no_op():
    c = InferenceContainer("whatever:1", docker_client=object())
    c.stop()
    c.stop()
    assert c.url == f"http://127.0.0.1:{c.port}" and c.name.startswith("nightshift-eval-")


def test_container_arguments_come_from_serving_run_kwargs(tmp_path):
    """InferenceContainer's ``containers.run`` arguments are containers.serving_run_kwargs' (what
    deploy uses), with the system-eval labels, no restart policy, and the extras on top."""
    from nightshift.containers import CONTAINER_LOG_DIR, ServingConfig, serving_run_kwargs

    config = ServingConfig(environment={"NIGHTSHIFT_REQUEST_LOG_ROTATE_S": "5"})
    c = InferenceContainer("img:1", docker_client=object(), config=config, request_log_dir=tmp_path / "log",
                           owner="d/r/t")
    spec = c.run_kwargs()
    assert spec == serving_run_kwargs("img:1", name=c.name, port=c.port, config=config,
                                      request_log_dir=tmp_path / "log", labels=c.labels)
    assert spec["environment"]["NIGHTSHIFT_REQUEST_LOG_SAMPLE"] == "1.0" and "restart_policy" not in spec
    assert spec["labels"]["ai.nightshift.role"] == "system-eval" and spec["labels"]["ai.nightshift.owner"] == "d/r/t"
    bare = InferenceContainer("img:1", docker_client=object(), config=config, environment={"MODEL_URI": "file:///m"},
                              volumes={"/host/m": {"bind": "/m", "mode": "ro"}}).run_kwargs()
    assert "NIGHTSHIFT_REQUEST_LOG_DIR" not in bare["environment"]  # no folder given: no request log
    assert bare["environment"]["MODEL_URI"] == "file:///m" and bare["environment"]["NIGHTSHIFT_REQUEST_LOG_ROTATE_S"] == "5"
    assert bare["volumes"] == {"/host/m": {"bind": "/m", "mode": "ro"}} and bare["mem_limit"] == "2g"
    assert CONTAINER_LOG_DIR in {v["bind"] for v in spec["volumes"].values()}


# ----------------------------------------------------------------------------- real container


def _gone(client, name: str) -> bool:
    import docker

    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return True
    return False


@pytest.mark.docker
def test_container_serves_tritonclient_and_is_removed(serving_image, serving_docker, serving_eval_set, tmp_path,
                                                      tiny_onnx_forward):
    """The built image, hardened as SystemEval (and deploy) run it: NVIDIA's client in JSON and
    binary mode, /metrics, and the request log in a mounted folder at the deployed rate."""
    import json
    import os
    import stat

    import requests
    import tritonclient.http as th

    images, labels = serving_eval_set
    log_dir = tmp_path / "requests"
    with InferenceContainer(serving_image["image"], docker_client=serving_docker, request_log_dir=log_dir,
                            environment={"NIGHTSHIFT_GRACEFUL_TIMEOUT_S": "2"}) as c:
        waited = c.wait_ready(timeout_s=60)
        assert waited >= 0
        info = serving_docker.containers.get(c.name).attrs
        assert info["HostConfig"]["NetworkMode"] == "host"
        assert info["HostConfig"]["CapDrop"] == ["ALL"]
        assert info["HostConfig"]["Memory"] == 2 * 1024 ** 3
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert info["Config"]["Labels"]["ai.nightshift.role"] == "system-eval"
        assert f"NIGHTSHIFT_PORT={c.port}" in info["Config"]["Env"]
        assert "NIGHTSHIFT_HOST=127.0.0.1" in info["Config"]["Env"]
        assert "NIGHTSHIFT_REQUEST_LOG_SAMPLE=1.0" in info["Config"]["Env"]
        assert not stat.S_IMODE(os.stat(log_dir).st_mode) & 0o002  # never world-writable
        res = evaluate_endpoint(c.url, "tiny", images, labels, batch_size=4)
        assert res["errors"] == 0 and res["accuracy"] == pytest.approx(0.75)

        client = th.InferenceServerClient(c.url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready("tiny", "1")
        assert client.get_model_metadata("tiny", "1")["inputs"][0]["datatype"] == "UINT8"
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        logits, _ = tiny_onnx_forward(images[:4])
        for binary in (False, True):
            inp = th.InferInput("pixels", [4, 4, 4, 1], "UINT8")
            inp.set_data_from_numpy(images[:4], binary_data=binary)
            r = client.infer("tiny", [inp], model_version="1",
                             outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
            np.testing.assert_allclose(r.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
            assert ("binary_data_size" in r.get_response()["outputs"][0].get("parameters", {})) == binary
        metrics = requests.get(f"{c.url}/metrics", timeout=5).text
        assert 'nightshift_requests_total{code="200",method="POST",route="infer"}' in metrics
        name = c.name
    assert _gone(serving_docker, name)
    c.stop()  # idempotent
    # the container was stopped gracefully enough to publish the request log
    files = list(log_dir.glob("requests-*.jsonl")) + list(log_dir.glob("*.part"))
    recs = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(recs) >= 20 and {r["model_name"] for r in recs} == {"tiny"}


@pytest.mark.docker
@pytest.mark.parametrize(
    ("kwargs", "timeout", "needle", "log_needle"),
    [
        pytest.param({"command": ["python", "-c", "print('nightshift-crash'); raise SystemExit(3)"]}, 30,
                     "exited with status 3", "nightshift-crash", id="crashes"),
        pytest.param({"environment": {"NIGHTSHIFT_MODEL_DIR": "/models/missing"}}, 30,
                     "exited with status 1", "missing/model.json does not exist", id="bad-model-dir"),
        pytest.param({"command": ["sleep", "60"]}, 1.5, "was not ready", "", id="never-ready"),
    ],
)
def test_container_removed_when_not_ready(serving_image, serving_docker, kwargs, timeout, needle, log_needle):
    c = InferenceContainer(serving_image["image"], docker_client=serving_docker, **kwargs)
    try:
        c.start()
        with pytest.raises(ServingError) as info:
            c.wait_ready(timeout_s=timeout)
        assert needle in str(info.value)
        assert log_needle in info.value.logs
    finally:
        c.stop()
    assert _gone(serving_docker, c.name)


@pytest.mark.docker
def test_missing_image(serving_docker):
    c = InferenceContainer("nightshift-test/does-not-exist:0", docker_client=serving_docker)
    with pytest.raises(ServingError, match="does not exist in the local daemon"):
        with c:
            pass
    assert _gone(serving_docker, c.name)


# ----------------------------------------------------------------------------- load client, skew, sweep


def test_loadgen_binary_against_the_server(serving_server, serving_eval_set):
    from nightshift.loadgen import infer_request, run_load

    images, _ = serving_eval_set
    req = infer_request(serving_server.url, "tiny", images[:1], binary=True)
    res = run_load(serving_server.url, req, concurrency=4, duration_s=1.0, warmup_s=0.2).summary()
    assert res["ok"] > 20 and res["errors"] == 0 and res["timeouts"] == 0 and res["rejected_503"] == 0
    assert res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] <= res["latency_ms"]["max"]
    assert res["throughput_rps"] == pytest.approx(res["ok"] / res["duration_s"], rel=1e-3)
    bad = infer_request(serving_server.url, "nope", images[:1], binary=False)
    res = run_load(serving_server.url, bad, concurrency=2, duration_s=0.5, warmup_s=0).summary()
    assert res["ok"] == 0 and res["errors"] == res["requests"] > 0 and res["status_counts"].keys() == {"404"}
    assert "HTTP 404" in res["error_samples"][0]


def test_loadgen_refuses_non_loopback_and_counts_timeouts():
    import socket as _socket

    from nightshift.errors import ConfigError
    from nightshift.loadgen import run_load

    with pytest.raises(ConfigError, match="only target loopback"):
        run_load("http://10.0.0.1:8080", b"", concurrency=1, duration_s=1)
    with _socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        res = run_load(url, b"GET / HTTP/1.1\r\n\r\n", concurrency=2, duration_s=0.6, timeout_s=0.25,
                       warmup_s=0).summary()
    assert res["timeouts"] >= 2 and res["ok"] == 0
    # when each timed-out request was sent: a stall shows as many timeouts at one moment
    assert len(res["timeout_at_s"]) == res["timeouts"] and all(0 <= t < 0.6 for t in res["timeout_at_s"])


def test_skew_report_names_images():
    from nightshift.evaluation import skew_report

    rep = skew_report(np.array([0, 1, 2, -1, 1]), np.array([0, 2, 2, 1, 0]))
    assert rep["n"] == 4 and rep["mismatches"] == 2 and rep["mismatch_rate"] == 0.5
    assert [e["index"] for e in rep["examples"]] == [1, 4]
    assert rep["examples"][0] == {"index": 1, "served": 1, "offline": 2}


@pytest.mark.docker
def test_sweep_removes_only_old_leftovers(serving_image, serving_docker):
    import time as _time

    from nightshift.evaluation import HOST_LABEL, ROLE_LABEL, STARTED_LABEL, sweep_containers

    import socket as _socket

    old = serving_docker.containers.create(serving_image["image"], ["sleep", "60"], network_mode="host", labels={
        ROLE_LABEL: "system-eval", STARTED_LABEL: str(int(_time.time()) - 7200), HOST_LABEL: _socket.gethostname()})
    new = serving_docker.containers.create(serving_image["image"], ["sleep", "60"], network_mode="host", labels={
        ROLE_LABEL: "system-eval", STARTED_LABEL: str(int(_time.time())), HOST_LABEL: _socket.gethostname()})
    try:
        removed = sweep_containers(serving_docker, older_than_s=3600)
        assert old.name in removed and new.name not in removed
        assert _gone(serving_docker, old.name) and not _gone(serving_docker, new.name)
    finally:
        for ctr in (old, new):
            try:
                ctr.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
