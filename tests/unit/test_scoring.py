"""Scoring (:mod:`nightshift.scoring`): an ONNX model on today's test split (the champion
comparison), and a running server on labelled images (score_endpoint, skew_report)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import onnx
import pytest

from nightshift.containers import free_port
from nightshift.errors import DataError
from nightshift.scoring import ScoringError, score_endpoint, score_onnx


@pytest.fixture(scope="module")
def onnx_model(trained, tmp_path_factory):
    from nightshift.export import export_onnx
    from nightshift.training import load_checkpoint

    return export_onnx(load_checkpoint(trained.checkpoint_path), tmp_path_factory.mktemp("score") / "model.onnx")


def test_scores_with_matching_classes(onnx_model, digits_snapshot):
    res = score_onnx(onnx_model, digits_snapshot.iter_split("test"), class_names=digits_snapshot.class_names)
    assert res["n"] == digits_snapshot.count("test") and res["accuracy"] > 0.5


def test_other_classes_are_an_error_not_a_low_score(onnx_model, digits_snapshot):
    """A champion trained on other (or reordered) classes cannot be compared: its gate must
    fail closed instead of passing against a near-chance score."""
    reordered = list(reversed(digits_snapshot.class_names))
    with pytest.raises(ScoringError, match="trained on classes"):
        score_onnx(onnx_model, digits_snapshot.iter_split("test"), class_names=reordered)


def test_a_model_that_does_not_name_its_classes_cannot_be_compared(onnx_model, digits_snapshot, tmp_path):
    proto = onnx.load(str(onnx_model))
    kept = [p for p in proto.metadata_props if p.key != "class_names"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ScoringError, match="does not record its class names"):
        score_onnx(bare, digits_snapshot.iter_split("test"), class_names=digits_snapshot.class_names)
    assert score_onnx(bare, digits_snapshot.iter_split("test"))["n"] > 0  # without class_names: no check


def test_scoring_error_is_a_domain_error_importable_from_both_modules(tmp_path):
    """The error type lives with the others in :mod:`nightshift.errors`; callers that import it
    from :mod:`nightshift.scoring` get the same class (a data error: a retry cannot fix it)."""
    from nightshift import errors, scoring

    assert scoring.ScoringError is errors.ScoringError
    assert issubclass(errors.ScoringError, errors.DataError) and not errors.ScoringError.retryable
    missing = tmp_path / "absent.onnx"
    with pytest.raises(errors.ScoringError, match=f"ONNX model {missing} does not exist"):
        score_onnx(missing, [])


# ----------------------------------------------------------------------------- served


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_accuracy_and_latency(serving_server, serving_eval_set, batch_size):
    images, labels = serving_eval_set
    res = score_endpoint(serving_server.url, "tiny", images, labels, batch_size=batch_size)
    assert res["n"] == 20 and res["errors"] == 0 and res["error_samples"] == []
    assert res["requests"] == -(-20 // batch_size)
    assert res["answered"] == 20 and res["correct"] == 15
    assert res["accuracy"] == pytest.approx(0.75) and res["accuracy_all"] == pytest.approx(0.75)
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
    assert res["throughput_ips"] > 0 and res["wall_s"] > 0


def test_no_nagle_delay(serving_server, serving_eval_set, monkeypatch):
    """Headers and body go out as two writes; without TCP_NODELAY each request waits ~40 ms for a
    delayed ACK. Checked on the client's sockets, which decide it, not on a latency, which a busy
    machine decides too."""
    import socket

    options: list[tuple[int, int, int]] = []
    real = socket.socket.setsockopt

    def recording(self, level, name, value, *rest):
        options.append((level, name, value))
        return real(self, level, name, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", recording)
    images, labels = serving_eval_set
    res = score_endpoint(serving_server.url, "tiny", images, labels, batch_size=1)
    assert res["errors"] == 0 and res["requests"] > 1
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in options, options


def test_label_output_only_needs_class_names(serving_server, serving_eval_set, monkeypatch, tiny_onnx_spec):
    # a server that answers only 'label' (no logits) is scored through class_names
    import nightshift.scoring as ev

    real = ev._payload
    monkeypatch.setattr(ev, "_payload", lambda batch, name: json.dumps(
        {**json.loads(real(batch, name)), "outputs": [{"name": "label"}]}).encode())
    images, labels = serving_eval_set
    res = score_endpoint(serving_server.url, "tiny", images, labels, batch_size=4,
                            class_names=tiny_onnx_spec["class_names"])
    assert res["errors"] == 0 and res["accuracy"] == pytest.approx(0.75)
    res = score_endpoint(serving_server.url, "tiny", images, labels, batch_size=4)  # no class names
    assert res["errors"] == 5 and "neither 'logits' nor" in res["error_samples"][0]


def test_wrong_shape_is_counted_not_raised(serving_server):
    images = np.zeros((6, 5, 5, 1), dtype=np.uint8)  # the model wants 4x4x1
    res = score_endpoint(serving_server.url, "tiny", images, np.zeros(6, dtype=np.int64), batch_size=2)
    assert res["requests"] == 3 and res["errors"] == 3 and res["errored_images"] == 6
    assert res["answered"] == 0 and res["accuracy"] is None and res["accuracy_all"] == 0.0
    assert res["latency_ms"]["p50"] is None
    assert len(res["error_samples"]) == 3
    assert "HTTP 400" in res["error_samples"][0] and "expected [n, 4, 4, 1]" in res["error_samples"][0]


def test_some_batches_fail(serving_server, serving_eval_set):
    # batches larger than the server's max (8) get 413; the rest are scored
    images, labels = serving_eval_set
    res = score_endpoint(serving_server.url, "tiny", images, labels, batch_size=9, max_error_samples=1)
    assert res["requests"] == 3 and res["errors"] == 2 and res["errored_images"] == 18
    assert res["answered"] == 2 and len(res["error_samples"]) == 1 and "HTTP 413" in res["error_samples"][0]
    assert res["accuracy_all"] == pytest.approx(res["correct"] / 20)


def test_unknown_model_and_unreachable_server(serving_server, serving_eval_set):
    images, labels = serving_eval_set
    res = score_endpoint(serving_server.url, "nope", images[:3], labels[:3])
    assert res["errors"] == 3 and "HTTP 404" in res["error_samples"][0]
    res = score_endpoint(f"http://127.0.0.1:{free_port()}", "tiny", images[:2], labels[:2], timeout_s=2)
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
        res = score_endpoint(f"http://127.0.0.1:{server.server_address[1]}", "m",
                                np.zeros((3, 4, 4, 1), np.uint8), np.zeros(3, np.int64), warmup=0)
    finally:
        server.shutdown()
        server.server_close()
    assert res["errors"] == 3 and res["answered"] == 0
    samples = " | ".join(res["error_samples"])
    assert "malformed response" in samples and "no 'outputs' list" in samples and "logits shape is [7, 3]" in samples


def test_bad_arguments():
    with pytest.raises(DataError, match="uint8"):
        score_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels must have shape \(2,\)"):
        score_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(DataError, match="batch_size"):
        score_endpoint("http://127.0.0.1:1", "m", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64),
                          batch_size=0)


def test_skew_report_names_images():
    from nightshift.scoring import skew_report

    rep = skew_report(np.array([0, 1, 2, -1, 1]), np.array([0, 2, 2, 1, 0]))
    assert rep["n"] == 4 and rep["mismatches"] == 2 and rep["mismatch_rate"] == 0.5
    assert [e["index"] for e in rep["examples"]] == [1, 4]
    assert rep["examples"][0] == {"index": 1, "served": 1, "offline": 2}
