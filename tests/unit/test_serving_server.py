"""The server (:mod:`nightshift.serving.server`): uvicorn in a thread and as a process
(configuration from the environment, JSON logs, SIGTERM hand-off and drain), the HTTP
layer's header limits (431), ``MODEL_URI`` and the ONNX Runtime thread layout."""

from __future__ import annotations

import http.client as httpclient
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from nightshift.containers import free_port
from nightshift.serving.server import Model
from tests.unit.serving_support import (
    assert_still_serving,
    good_json,
    infer_body,
    serve,
    wait_for,
)

SERVING_DIR = Path(__file__).resolve().parents[2] / "plugins" / "nightshift" / "serving"
PLUGIN_SERVING = SERVING_DIR.parent


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
                    r = s.post(f"{serving_server.url}/v2/models/tiny/infer", json=infer_body(pixels), timeout=10)
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


def _shutting_down(port: int) -> bool:
    """Whether the server's readiness, asked on a connection of its own, says it is shutting down."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v2/health/ready")
        r = conn.getresponse()
        return r.status == 503 and "shutting down" in json.loads(r.read())["error"]
    finally:
        conn.close()


def test_runs_as_module_logs_json_and_drains_on_sigterm(tiny_onnx_model_dir, pixels):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server"], cwd=SERVING_DIR.parent, stderr=subprocess.PIPE, text=True,
        env=_env(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(port), NIGHTSHIFT_ORT_THREADS="1",
                 NIGHTSHIFT_LOG_LEVEL="INFO", NIGHTSHIFT_ACCESS_LOG_SAMPLE="1",
                 NIGHTSHIFT_DRAIN_S="60"),  # the hand-off lasts while the request below is open
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        assert requests.post(f"{url}/v2/models/tiny/infer", json=infer_body(pixels), timeout=5).status_code == 200
        # a request in flight (half its body sent) when SIGTERM arrives is still answered
        body = json.dumps(infer_body(pixels)).encode()
        conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v2/health/ready")  # the server has accepted this (keep-alive) connection
        ready = conn.getresponse()
        assert ready.status == 200 and json.loads(ready.read())["ready"] is True
        conn.putrequest("POST", "/v2/models/tiny/infer", skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:10])
        proc.send_signal(signal.SIGTERM)
        # the rest of the body goes only once the server acts on the signal, so the request
        # cannot silently become an ordinary one answered before the signal landed
        wait_for(lambda: _shutting_down(port), what="the server to act on SIGTERM")
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
    proc = subprocess.run(
        [sys.executable, str(SERVING_DIR / "server.py")], cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env=_env(NIGHTSHIFT_MODEL_DIR=str(tmp_path / "missing"), NIGHTSHIFT_PORT=str(free_port())),
    )
    assert proc.returncode == 1
    assert "model failed to load" in proc.stderr and "missing/model.json does not exist" in proc.stderr


@pytest.mark.parametrize(("var", "value", "message"), [
    ("NIGHTSHIFT_GIL_SWITCH_MS", "0", "NIGHTSHIFT_GIL_SWITCH_MS=0.0 is outside 0.01..100"),
    ("NIGHTSHIFT_BATCH_SHARE", "2", "NIGHTSHIFT_BATCH_SHARE=2 must be 0 or 1"),
])
def test_out_of_range_settings_are_refused(var, value, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update({var: value, "NIGHTSHIFT_PORT": "0", "PYTHONPATH": str(PLUGIN_SERVING)})
    proc = subprocess.run([sys.executable, "-m", "serving.server"], env=env, cwd=PLUGIN_SERVING,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_sigterm_hands_keep_alive_clients_over_before_closing(tiny_onnx_model_dir):
    """After SIGTERM an open keep-alive connection is answered once more with
    ``Connection: close`` (the client reconnects, through a proxy to the new server)
    instead of being cut while idle; readiness says 503; then the server exits 0, once its
    clients have gone, long before the hand-off's limit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(port), NIGHTSHIFT_DRAIN_S="60",
               PYTHONPATH=str(PLUGIN_SERVING))
    proc = subprocess.Popen([sys.executable, "-m", "serving.server"], env=env, cwd=PLUGIN_SERVING,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
                conn.close()
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.05)
        assert resp.getheader("connection") != "close"  # keep-alive before the signal
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _shutting_down(port), what="the server to act on SIGTERM")
        other = httpclient.HTTPConnection("127.0.0.1", port, timeout=5)  # still accepting meanwhile
        other.request("GET", "/v2/health/ready")
        r = other.getresponse()
        assert r.status == 503 and "shutting down" in json.loads(r.read())["error"]
        other.request("GET", "/v2/models/tiny/ready")  # the model's readiness says the same
        r = other.getresponse()
        assert r.status == 503 and "shutting down" in json.loads(r.read())["error"]
        other.close()
        conn.request("GET", "/v2/models/tiny")  # the idle keep-alive connection is still served
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "tiny"
        assert resp.getheader("connection") == "close"
        conn.close()
        try:
            code = proc.wait(30)  # bounds a hang only: the hand-off's limit is 60 s
        except subprocess.TimeoutExpired:
            pytest.fail("the server still ran 30 s after its last client left: it waited for the hand-off's limit")
        assert code == 0  # ended once its clients had gone, not at the 60 s limit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- header fields (431)


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


def test_too_many_header_fields_is_431(serving_default_server, http):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))  # + Host: 101
    answer = _raw_request(serving_default_server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert "connection: close" in answer.lower()
    assert "more than 100 header fields (NIGHTSHIFT_MAX_HEADERS)" in _json_error(answer)
    # 100 fields in all are fine
    answer = _raw_request(serving_default_server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          + fields[: fields.index(b"X-F98")] + b"\r\n")
    assert answer.startswith("HTTP/1.1 200"), answer[:200]
    assert_still_serving(http, serving_default_server.url)


@pytest.mark.parametrize(("head", "needle"), [
    pytest.param(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                 "header fields exceed 16384 bytes", id="one-large-field"),
    pytest.param(b"GET /v2/health/live?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 "request line exceeds 16384 bytes", id="long-request-line"),
])
def test_oversized_header_fields_are_431(serving_default_server, http, head, needle):
    answer = _raw_request(serving_default_server.url, head)
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert needle in _json_error(answer) and "NIGHTSHIFT_MAX_HEADER_BYTES" in _json_error(answer)
    assert_still_serving(http, serving_default_server.url)


def test_a_header_field_that_never_ends_is_431_before_it_is_all_buffered(serving_default_server, http):
    # 12 writes of 8 KiB, the field never ends: httptools would buffer it for ever
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (96 << 10)
    answer = _raw_request(serving_default_server.url, head, pieces=12, pause_s=0.05)
    assert answer.startswith("HTTP/1.1 431"), answer[:200]
    assert "header fields exceed 16384 bytes" in _json_error(answer)
    assert_still_serving(http, serving_default_server.url)


def test_header_limits_are_settable_and_pipelined_requests_pass(tiny_onnx_model_dir, http):
    srv = serve(tiny_onnx_model_dir, max_headers=3, max_header_bytes=200)
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
        body = good_json(8)
        assert len(body) > 4 * 200
        head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        for pieces in (1, 8):
            answer = _raw_request(srv.url, head % len(body) + body, pieces=pieces, pause_s=0.02)
            assert answer.startswith("HTTP/1.1 200"), answer[:300]
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- model URI and thread layout


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


def test_ort_layout_defaults_to_one_thread_per_instance_per_cpu():
    from nightshift.serving.server import ort_layout

    assert ort_layout(4) == (1, 4)
    assert ort_layout(4, threads=2) == (2, 2)
    assert ort_layout(4, threads=8) == (8, 1)
    assert ort_layout(4, instances=1) == (1, 1)
    assert ort_layout(0) == (1, 1)
