"""The request log (:mod:`nightshift.serving.requestlog`): records as the training profile
computes them, one definition of the statistics over a whole batch, compact binary frames a
reader takes back intact (or not at all), a writer that never blocks the request path and
batches its work, recovery of a killed server's files (either format), the byte budget and
rotation, sampling, and the settings parsed in one place."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest
import requests

from tests.unit.serving_support import serve, wait_for

META = {"model_name": "m", "model_version": "1", "class_names": ["a", "b", "c"], "endpoint": "infer"}


def _sample(n: int = 1, seed: int = 0, emb_dim: int | None = 4):
    rng = np.random.default_rng(seed)
    out = {"logits": rng.normal(size=(n, 3)).astype(np.float32)}
    if emb_dim:
        out["embedding"] = rng.normal(size=(n, emb_dim)).astype(np.float32)
    return rng.integers(0, 256, (n, 2, 2, 1), dtype=np.uint8), out


def _frames(directory):
    from nightshift.serving.requestlog import read_file

    return [fr for f in sorted(directory.glob("requests-*.nsrl")) for fr in read_file(f)[0]]


# --------------------------------------------------------------------------- records


def test_request_log_records_match_the_training_profile(tiny_onnx_model_dir, tmp_path, x, tiny_onnx_forward):
    from nightshift.data.decode import image_stats
    from nightshift.serving.requestlog import SCHEMA, RequestLog, read_records

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
    files = list((tmp_path / "log").glob("requests-*.nsrl"))
    assert len(files) == 1
    recs = read_records(files)
    assert len(recs) == 3
    stats = image_stats(x)
    logits, emb = tiny_onnx_forward(x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i, rec in enumerate(recs):
        assert rec["schema"] == SCHEMA and rec["model_name"] == "tiny" and rec["model_version"] == "1"
        assert rec["timestamp"].endswith("Z") and rec["endpoint"] == "infer"
        assert (rec["height"], rec["width"], rec["channels"]) == (4, 4, 1)
        assert rec["brightness"] == stats["brightness"][i]  # the same function: exactly the same value
        assert rec["contrast"] == stats["contrast"][i]
        assert rec["mean_ch0"] == stats["mean_ch0"][i]
        assert rec["sha256"] == stats["sha256"][i]
        assert rec["predicted_index"] == int(logits[i].argmax())
        assert rec["predicted_class"] == ["zero", "one", "two"][rec["predicted_index"]]
        assert rec["confidence"] == pytest.approx(p[i].max(), rel=1e-5)
        np.testing.assert_allclose(rec["embedding"], emb[i], rtol=1e-3, atol=1e-4)  # stored as float16


def test_image_stats_of_a_batch_are_each_images_own():
    """One definition: the writer computes the statistics over everything pending at once; each
    image gets exactly the values it gets alone, and those of the definition written out."""
    from nightshift.data.decode import image_digests, image_moments, image_stats

    rng = np.random.default_rng(5)
    for shape in ((37, 8, 8, 1), (19, 32, 32, 3), (5, 3, 7, 3), (2, 300, 300, 3), (3, 64, 64, 4)):
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        batch[0] = 255  # the largest sums
        whole = image_stats(batch)
        for i in range(len(batch)):
            alone = image_stats(batch[i:i + 1])
            for key, values in whole.items():
                assert values[i] == alone[key][0], (shape, i, key)
            # the definition, as the profile table has always computed it, one image at a time
            im = batch[i:i + 1]
            flat = im.reshape(1, -1).astype(np.float32)
            assert whole["sha256"][i] == hashlib.sha256(im.tobytes()).hexdigest()
            assert whole["brightness"][i] == flat.mean(axis=1).astype(np.float64)[0]
            assert whole["contrast"][i] == flat.std(axis=1).astype(np.float64)[0]
            ch = im.reshape(1, -1, shape[-1]).astype(np.float32).mean(axis=1)
            for k in range(shape[-1]):
                assert whole[f"mean_ch{k}"][i] == ch[0, k].astype(np.float64), (shape, i, k)
        assert [d.hex() for d in image_digests(batch)] == whole["sha256"]
        assert set(image_moments(batch)) == set(whole) - {"sha256"}
    # a non-contiguous batch (a slice of a larger one) hashes its own pixels
    big = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    assert image_stats(big[::2])["sha256"] == [hashlib.sha256(im.tobytes()).hexdigest() for im in big[::2]]
    assert image_stats(np.zeros((0, 4, 4, 1), np.uint8))["sha256"] == []


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
    assert recs[0]["timestamp"] == "1970-01-01T00:00:00.000Z" and recs[0]["embedding"] is None


# --------------------------------------------------------------------------- frames


def test_frames_round_trip_and_a_damaged_frame_ends_the_file():
    from nightshift.serving.requestlog import build_frame, encode_frame, iter_frames

    pixels, out = _sample(4, emb_dim=8)
    t = np.array([1_700_000_000_123_456] * 4, np.int64)
    rec = build_frame(pixels, out, t)
    assert rec.dtype["embedding"].base == np.float16  # compact: 2 bytes a value
    data = b"".join(bytes(p) for p in encode_frame(rec, shape=(2, 2, 1), **META)) * 2
    frames = list(iter_frames(data))
    assert [end for end, _, _ in frames] == [len(data) // 2, len(data)]
    header, back = frames[0][1], frames[0][2]
    assert header["n"] == 4 and header["class_names"] == ["a", "b", "c"] and header["shape"] == [2, 2, 1]
    assert back.tobytes() == rec.tobytes()
    np.testing.assert_allclose(back["embedding"].astype(np.float32), out["embedding"], rtol=1e-3, atol=1e-4)
    # cut anywhere inside the second frame: the first still reads, the second does not
    for cut in (len(data) // 2 + 3, len(data) - 1):
        assert [end for end, _, _ in iter_frames(data[:cut])] == [len(data) // 2]
    # one flipped bit in the second frame's body: its CRC fails
    damaged = bytearray(data)
    damaged[-5] ^= 0x01
    assert [end for end, _, _ in iter_frames(bytes(damaged))] == [len(data) // 2]
    assert list(iter_frames(b"not a request log at all, just text\n")) == []


def test_embeddings_float16_cannot_hold_are_stored_as_float32_and_none_is_none():
    from nightshift.serving.requestlog import build_frame, frame_columns

    pixels, out = _sample(2, emb_dim=3)
    out["embedding"][1, 2] = 1e6  # beyond float16's 65504
    rec = build_frame(pixels, out, np.zeros(2, np.int64))
    assert rec.dtype["embedding"].base == np.float32
    cols = frame_columns({"shape": [2, 2, 1], "class_names": ["a", "b", "c"], **META}, rec)
    assert cols["embedding"][1][2] == 1e6
    pixels, out = _sample(2, emb_dim=None)
    rec = build_frame(pixels, out, np.zeros(2, np.int64))
    assert "embedding" not in rec.dtype.names
    assert frame_columns({"shape": [2, 2, 1], "class_names": ["a", "b", "c"], **META}, rec)["embedding"] == [None] * 2


# --------------------------------------------------------------------------- the writer


def test_request_log_never_blocks_and_counts_drops(tmp_path):
    from nightshift.serving.requestlog import RequestLog

    rl = RequestLog(tmp_path, sample_rate=1.0, queue_size=1, flush_s=0.01)
    disk = threading.Event()
    rl._write_frame = lambda parts: disk.wait(60)  # a stuck disk: no write ends until the test says so
    results: list[bool] = []

    def submit_all() -> None:
        results.extend(rl.submit(*_sample(), **META) for _ in range(50))

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    submitter.join(30)  # bounds a hang only: a submit that waited for the stuck disk would still be waiting
    assert not submitter.is_alive(), "submit() blocked while the writer was stuck"
    assert results.count(False) == rl.dropped > 0
    disk.set()
    rl.close()


def test_pending_bytes_are_bounded_too(tmp_path):
    from nightshift.serving.requestlog import RequestLog

    rl = RequestLog(tmp_path, sample_rate=1.0, queue_bytes=10, flush_s=3600)
    pixels, out = _sample()  # 4 bytes of pixels
    assert [rl.submit(pixels, out, **META) for _ in range(3)] == [True, True, False]
    assert rl.dropped == 1
    rl.close()
    assert rl.written == 2


def test_the_writer_batches_requests_into_one_frame_per_model_and_endpoint(tmp_path):
    """What keeps the log cheap: everything pending is written at once, per model and endpoint,
    with each request's own time and values."""
    from nightshift.serving.requestlog import RequestLog, frame_columns

    rl = RequestLog(tmp_path, sample_rate=1.0, flush_s=3600)  # nothing is written before close()
    sent = []
    for i in range(60):
        pixels, out = _sample(1 + i % 3, seed=i)
        meta = {**META, "class_names": list(META["class_names"])}  # equal lists, not the same object
        if i % 4 == 3:
            meta["endpoint"] = "classify"
        if i % 10 == 9:
            meta["model_version"] = "2"
        assert rl.submit(pixels, out, **meta)
        sent.append((pixels, out, meta))
    rl.close()
    assert rl.failed == 0 and rl.written == sum(len(p) for p, _, _ in sent)
    frames = _frames(tmp_path)
    keys = [(h["model_version"], h["endpoint"]) for h, _ in frames]
    assert sorted(keys) == sorted({(m["model_version"], m["endpoint"]) for _, _, m in sent})  # one frame each
    by_key = {(h["model_version"], h["endpoint"]): frame_columns(h, r) for h, r in frames}
    for key, cols in by_key.items():
        mine = [(p, o) for p, o, m in sent if (m["model_version"], m["endpoint"]) == key]
        pixels = np.concatenate([p for p, _ in mine])
        logits = np.concatenate([o["logits"] for _, o in mine])
        assert cols["sha256"] == [hashlib.sha256(im.tobytes()).hexdigest() for im in pixels]
        assert cols["predicted_index"].tolist() == logits.argmax(1).tolist()
        assert all(t.endswith("Z") for t in cols["timestamp"])


def test_the_writer_writes_what_was_pending_at_each_tick(tmp_path):
    from nightshift.serving.requestlog import RequestLog, count_records

    rl = RequestLog(tmp_path, sample_rate=1.0, flush_s=0.05, rotate_s=3600)
    assert rl.submit(*_sample(), **META)
    wait_for(lambda: rl.written == 1, what="the writer's next tick to write the pending record")
    assert count_records(tmp_path) == 1  # readable in the .part file already, frame by frame
    assert list(tmp_path.glob("requests-*.nsrl.part")) and not list(tmp_path.glob("requests-*.nsrl"))
    rl.close()
    assert count_records(tmp_path) == 1 and list(tmp_path.glob("requests-*.nsrl"))


def test_rotation_by_size_and_the_byte_budget(tmp_path):
    from nightshift.serving.requestlog import RequestLog, count_records, enforce_budget

    rl = RequestLog(tmp_path, sample_rate=1.0, flush_s=0.01, rotate_bytes=1, rotate_s=3600)
    for i in range(3):  # every frame fills a file: one published file per write
        assert rl.submit(*_sample(seed=i), **META)
        wait_for(lambda i=i: len(list(tmp_path.glob("requests-*.nsrl"))) == i + 1, what=f"file {i + 1}")
    rl.close()
    files = sorted(tmp_path.glob("requests-*.nsrl"))
    assert len(files) == 3 and count_records(tmp_path) == 3 and not list(tmp_path.glob("*.part"))
    legacy = tmp_path / "requests-20000101T000000-old-1-aaaaaa-00001.jsonl"  # the oldest, by name
    legacy.write_text('{"schema":"nightshift.request_log/1"}\n')
    size = files[0].stat().st_size
    deleted = enforce_budget(tmp_path, max_bytes=2 * size, max_files=1000)
    assert deleted == [legacy, files[0]]
    assert enforce_budget(tmp_path, max_bytes=1 << 30, max_files=1) == [files[1]]
    assert sorted(tmp_path.glob("requests-*")) == [files[2]]


def test_request_log_publishes_a_killed_servers_files_but_not_a_live_ones(tmp_path):
    from nightshift.serving.requestlog import RequestLog, build_frame, encode_frame, read_records

    live = RequestLog(tmp_path, sample_rate=1.0, rotate_s=3600, flush_s=0.01)
    assert live.submit(*_sample(), **META)
    wait_for(lambda: live.written >= 1, what="the live log's writer to write its record")
    (live_part,) = tmp_path.glob("requests-*.nsrl.part")
    # what a SIGKILLed server leaves: a .part file nobody holds, its last frame cut short
    pixels, out = _sample(2)
    frame = b"".join(bytes(p) for p in encode_frame(build_frame(pixels, out, np.zeros(2, np.int64)),
                                                     shape=(2, 2, 1), **{**META, "model_name": "dead"}))
    dead = tmp_path / "requests-20260101T000000-deadhost-7-abc123-00001.nsrl.part"
    dead.write_bytes(frame + frame[:-10])
    empty = tmp_path / "requests-20260101T000000-deadhost-7-abc123-00002.nsrl.part"
    empty.write_bytes(frame[:30])  # no complete frame
    # and one from a server of before the binary format, its last line cut short
    old = tmp_path / "requests-20260101T000000-oldhost-8-def456-00001.jsonl.part"
    old.write_text('{"schema":"nightshift.request_log/1","n":1}\n{"schema":"nightshift.req')

    restarted = RequestLog(tmp_path, sample_rate=1.0)

    assert sorted(p.name for p in restarted.recovered) == sorted([dead.name[:-5], old.name[:-5]])
    assert (tmp_path / dead.name[:-5]).read_bytes() == frame
    assert (tmp_path / old.name[:-5]).read_text() == '{"schema":"nightshift.request_log/1","n":1}\n'
    assert not empty.exists()
    assert live_part.exists()  # the running server's file is left to it
    live.close()
    restarted.close()
    assert not list(tmp_path.glob("*.part"))
    records = read_records(tmp_path)
    assert [r.get("model_name") for r in records].count("m") == 1
    assert [r.get("model_name") for r in records].count("dead") == 2


# --------------------------------------------------------------------------- settings


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


def test_settings_come_from_one_environment_parse():
    from nightshift.serving.requestlog import RequestLogConfig

    cfg = RequestLogConfig.from_env({"NIGHTSHIFT_REQUEST_LOG_DIR": "/var/log/nightshift",
                                     "NIGHTSHIFT_REQUEST_LOG_SAMPLE": "1.0", "NIGHTSHIFT_REQUEST_LOG_ROTATE_S": "5",
                                     "NIGHTSHIFT_REQUEST_LOG_MAX_BYTES": "1000000",
                                     "NIGHTSHIFT_REQUEST_LOG_QUEUE_BYTES": "", "NIGHTSHIFT_OTHER": "x"})
    assert (cfg.directory, cfg.sample_rate, cfg.rotate_s, cfg.max_bytes) == ("/var/log/nightshift", 1.0, 5.0, 1000000)
    assert cfg.queue_bytes == RequestLogConfig().queue_bytes  # empty: the default
    assert RequestLogConfig.from_env({}).directory is None  # no directory: no log
    with pytest.raises(ValueError, match="NIGHTSHIFT_REQUEST_LOG_SAMPLE.*within 0..1"):
        RequestLogConfig.from_env({"NIGHTSHIFT_REQUEST_LOG_SAMPLE": "1.5"})
    with pytest.raises(ValueError, match="NIGHTSHIFT_REQUEST_LOG_MAX_BYTES='lots' is not an int"):
        RequestLogConfig.from_env({"NIGHTSHIFT_REQUEST_LOG_MAX_BYTES": "lots"})
    with pytest.raises(ValueError, match="NIGHTSHIFT_REQUEST_LOG_FLUSH_S.*above 0"):
        RequestLogConfig.from_env({"NIGHTSHIFT_REQUEST_LOG_FLUSH_S": "0"})


def test_the_server_entry_point_reads_the_settings_once(tmp_path, tiny_onnx_model_dir):
    """``python -m serving.server`` (the image's entry point) with a bad request-log setting
    stops at start, naming it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import nightshift

    pkg = Path(nightshift.__file__).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update({"NIGHTSHIFT_MODEL_DIR": str(tiny_onnx_model_dir), "NIGHTSHIFT_PORT": "0",
                "NIGHTSHIFT_REQUEST_LOG_DIR": str(tmp_path), "NIGHTSHIFT_REQUEST_LOG_ROTATE_BYTES": "64MiB",
                "PYTHONPATH": os.pathsep.join([str(pkg), str(pkg.parent)])})  # decode.py: nightshift.data
    done = subprocess.run([sys.executable, "-m", "serving.server"], cwd=pkg, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "NIGHTSHIFT_REQUEST_LOG_ROTATE_BYTES='64MiB' is not an int" in done.stderr, done.stderr


def test_legacy_json_lines_still_read(tmp_path):
    from nightshift.serving.requestlog import count_records, read_records

    (tmp_path / "requests-20260101T000000-h-1-a-00001.jsonl").write_text(
        json.dumps({"schema": "nightshift.request_log/1", "model_name": "old"}) + "\n")
    assert count_records(tmp_path) == 1 and read_records(tmp_path)[0]["model_name"] == "old"
