"""The request log (:mod:`nightshift.serving.requestlog`): records as the training profile
computes them, a writer that never blocks the request path, recovery of a killed server's
files, sampling."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests

from tests.unit.serving_support import serve, wait_for


def test_request_log_records_match_the_training_profile(tiny_onnx_model_dir, tmp_path, x, tiny_onnx_forward):
    from nightshift.data.decode import image_stats
    from nightshift.serving.requestlog import SCHEMA, RequestLog

    rl = RequestLog(tmp_path / "log", sample_rate=1.0, rotate_s=60)
    srv = serve(tiny_onnx_model_dir, request_log=rl)
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
    disk = threading.Event()
    rl._write = lambda text: disk.wait(60)  # a stuck disk: no write ends until the test says so
    results: list[bool] = []

    def submit_all() -> None:
        results.extend(rl.submit(np.zeros((1, 2, 2, 1), np.uint8), {"logits": np.zeros((1, 3), np.float32)},
                                 model_name="m", model_version="1", class_names=["a", "b", "c"], endpoint="infer")
                       for _ in range(50))

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    submitter.join(30)  # bounds a hang only: a submit that waited for the stuck disk would still be waiting
    assert not submitter.is_alive(), "submit() blocked while the writer was stuck"
    assert results.count(False) == rl.dropped > 0
    disk.set()
    rl.close()


def test_request_log_publishes_a_killed_servers_files_but_not_a_live_ones(tmp_path):
    from nightshift.serving.requestlog import RequestLog

    sample = (np.zeros((1, 2, 2, 1), np.uint8), {"logits": np.zeros((1, 3), np.float32)})
    meta = {"model_name": "m", "model_version": "1", "class_names": ["a", "b", "c"], "endpoint": "infer"}
    live = RequestLog(tmp_path, sample_rate=1.0, rotate_s=3600)
    assert live.submit(*sample, **meta)
    wait_for(lambda: live.written >= 1, what="the live log's writer to write its record")
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
    import tempfile

    from nightshift.serving.requestlog import RequestLog

    with tempfile.TemporaryDirectory() as d:
        rl = RequestLog(d, sample_rate=0.1, seed=3)
        hits = sum(rl.sampled() for _ in range(5000))
        rl.close()
    assert 350 < hits < 650
    with pytest.raises(ValueError, match="within 0..1"):
        RequestLog(tempfile.gettempdir(), sample_rate=2)


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
