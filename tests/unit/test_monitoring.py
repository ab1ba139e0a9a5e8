"""Drift monitoring of served traffic on real digits through a real ONNX model, read from the
request log in the serving image's binary format and in the JSON Lines of older images."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from tests.unit.served_traffic import served_records as _records

from nightshift import monitoring

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def champion(digits_snapshot, trained, tmp_path_factory):
    from nightshift.export import export_and_verify
    from nightshift.training import load_checkpoint

    out = tmp_path_factory.mktemp("champion")
    exp = export_and_verify(load_checkpoint(trained.checkpoint_path), out / "model",
                            digits_snapshot.iter_split("test"), model_name="digits")
    ref = monitoring.champion_reference(digits_snapshot, exp["onnx_path"], out / "reference.parquet")
    return {"onnx": exp["onnx_path"], "reference": ref, "version": exp["model_meta"]["version"]}


def _write_log(directory, records, name="requests-20261123T100000-1-00001.jsonl"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_binary(directory, images, outputs, classes, start, *, name="requests-20261123T100000-1-00001.nsrl",
                  model_name="digits", version="v", chunk=16, seconds_apart=1.0):
    """What the serving image writes for these images and model outputs: frames of ``chunk``
    records, the i-th image answered at ``start + i * seconds_apart``."""
    from nightshift.serving.requestlog import build_frame, encode_frame

    directory.mkdir(parents=True, exist_ok=True)
    t0 = int(start.timestamp() * 1_000_000)
    with open(directory / name, "ab") as fh:
        for i in range(0, len(images), chunk):
            px = images[i:i + chunk]
            times = t0 + (np.arange(i, i + len(px)) * seconds_apart * 1e6).astype(np.int64)
            rec = build_frame(px, {k: v[i:i + chunk] for k, v in outputs.items()}, times)
            for part in encode_frame(rec, model_name=model_name, model_version=version, endpoint="infer",
                                     class_names=classes, shape=px.shape[1:]):
                fh.write(part)


def _outputs(images, onnx_path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"pixels": images})
    return {"logits": logits, "embedding": emb}


def _legacy_records(images, outputs, classes, start, version="v"):
    """The JSON Lines records a server of before the binary format wrote (every field of the
    contract, floats as JSON floats), the i-th image answered at ``start + i`` seconds."""
    from nightshift.data.decode import image_stats

    st = image_stats(images)
    logits = outputs["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, h, w, c = images.shape
    out = []
    for i in range(n):
        t = (start + timedelta(seconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rec = {"schema": "nightshift.request_log/1", "timestamp": t, "model_name": "digits", "model_version": version,
               "endpoint": "infer", "height": h, "width": w, "channels": c, "sha256": st["sha256"][i],
               "brightness": float(st["brightness"][i]), "contrast": float(st["contrast"][i])}
        for k in range(c):
            rec[f"mean_ch{k}"] = float(st[f"mean_ch{k}"][i])
        idx = int(logits[i].argmax())
        rec.update(predicted_index=idx, predicted_class=classes[idx], confidence=float(p[i, idx]),
                   embedding=[float(v) for v in outputs["embedding"][i]])
        out.append(rec)
    return out


def test_binary_log_reads_back_the_frame_the_json_lines_gave(tmp_path, champion, digits_snapshot):
    """The fields drift_monitor reads survive the binary format: the same columns, in the same
    order, with the same types and values; embeddings within float16 precision."""
    x, _ = digits_snapshot.split("val")
    x, classes = x[:120], digits_snapshot.class_names
    outputs = _outputs(x, champion["onnx"])
    _write_log(tmp_path / "json", _legacy_records(x, outputs, classes, T0))
    _write_binary(tmp_path / "bin", x, outputs, classes, T0)
    window = (T0 + timedelta(seconds=5), T0 + timedelta(seconds=100))
    old = monitoring.read_request_log(tmp_path / "json", *window)
    new = monitoring.read_request_log(tmp_path / "bin", *window)
    assert len(old) == len(new) == 95
    assert list(new.columns) == list(old.columns)
    assert dict(new.dtypes) == dict(old.dtypes)
    for col in old.columns:
        if col != "embedding":
            assert new[col].tolist() == old[col].tolist(), col
    emb_old, emb_new = np.stack(old["embedding"].to_list()), np.stack(new["embedding"].to_list())
    assert all(isinstance(e, list) for e in new["embedding"])
    np.testing.assert_allclose(emb_new, emb_old, rtol=2 ** -10, atol=1e-6)  # float16: 10-bit mantissa
    assert new.attrs == {"bad_lines": 0, "bad_files": 0}


def test_a_directory_across_versions_reads_both_formats_in_time_order(tmp_path, champion, digits_snapshot):
    x, _ = digits_snapshot.split("val")
    classes = digits_snapshot.class_names
    outputs = _outputs(x[:40], champion["onnx"])
    _write_log(tmp_path, _legacy_records(x[:20], outputs, classes, T0),
               name="requests-20261123T100000-old-1-aaaaaa-00001.jsonl")
    later = {k: v[20:] for k, v in outputs.items()}
    _write_binary(tmp_path, x[20:40], later, classes, T0 + timedelta(seconds=20),
                  name="requests-20261123T100020-new-2-bbbbbb-00001.nsrl")
    df = monitoring.read_request_log(tmp_path, T0, T0 + timedelta(hours=1), model_name="digits")
    assert len(df) == 40 and df["timestamp"].is_monotonic_increasing
    assert df["sha256"].tolist() == [hashlib.sha256(im.tobytes()).hexdigest() for im in x[:40]]


def test_binary_window_filters_by_time_and_model_and_skips_a_damaged_tail(tmp_path, champion, digits_snapshot):
    x, _ = digits_snapshot.split("val")
    x, classes = x[:50], digits_snapshot.class_names
    outputs = _outputs(x, champion["onnx"])
    _write_binary(tmp_path, x, outputs, classes, T0)
    _write_binary(tmp_path, x[:10], {k: v[:10] for k, v in outputs.items()}, classes, T0 + timedelta(seconds=15),
                  model_name="other", name="requests-20261123T100000-2-00001.nsrl")  # inside the window, another model
    (tmp_path / "requests-x.nsrl.part").write_bytes(b"half a frame")  # being written: never read
    f = tmp_path / "requests-20261123T100000-1-00001.nsrl"
    f.write_bytes(f.read_bytes() + b"NSRL\x01\r\n\x00 torn")  # a damaged tail: read up to it, counted
    df = monitoring.read_request_log(tmp_path, T0 + timedelta(seconds=10), T0 + timedelta(seconds=40),
                                     model_name="digits")
    assert len(df) == 30 and df.attrs == {"bad_lines": 0, "bad_files": 1}
    assert set(df["model_name"]) == {"digits"}


def test_drift_is_judged_on_a_window_read_from_the_binary_log(tmp_path, champion, digits_snapshot):
    """The drift path end to end from the served log's bytes: darker traffic is drift."""
    x, _ = digits_snapshot.split("train")
    darker = (x[:400].astype(np.float32) * 0.35).astype(np.uint8)
    _write_binary(tmp_path / "log", darker, _outputs(darker, champion["onnx"]), digits_snapshot.class_names, T0,
                  seconds_apart=0.01)
    window = monitoring.read_request_log(tmp_path / "log", T0, T0 + timedelta(minutes=1), model_name="digits")
    assert len(window) == 400
    res = monitoring.check_served_drift(champion["reference"], window, tmp_path / "shifted")
    assert res["drift_detected"] is True and "brightness" in res["drifted_columns"]
    monitoring.write_request_window(window, tmp_path / "window.parquet")  # the evidence that leaves the host
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "window.parquet")) == 400


def test_reference_has_the_champions_outputs_on_its_test_split(champion, digits_snapshot):
    ref = champion["reference"]
    assert len(ref) == digits_snapshot.count("test")
    assert {"brightness", "contrast", "mean_ch0", "predicted_class", "confidence", "embedding"} <= set(ref.columns)
    assert ref["confidence"].between(0, 1).all() and len(ref["embedding"].iloc[0]) > 1


def test_window_reading_filters_by_time_and_model(tmp_path, champion, digits_snapshot):
    x, _ = digits_snapshot.split("val")
    recs = _records(x[:50], champion["onnx"], digits_snapshot.class_names, T0)
    recs[13]["model_name"] = "other"  # inside the window, another model
    _write_log(tmp_path, recs)
    (tmp_path / "requests-x.jsonl.part").write_text("{half a record")  # being written: never read
    with open(tmp_path / "requests-20261123T100000-1-00001.jsonl", "a") as f:
        f.write("not json\n")
    df = monitoring.read_request_log(tmp_path, T0 + timedelta(seconds=10), T0 + timedelta(seconds=40),
                                     model_name="digits")
    assert len(df) == 29 and df.attrs["bad_lines"] == 1


def test_normal_traffic_is_not_drift_shifted_traffic_is(tmp_path, champion, digits_snapshot):
    classes = digits_snapshot.class_names
    x, _ = digits_snapshot.split("train")
    x = x[np.random.default_rng(0).permutation(len(x))]  # served traffic arrives in no particular order
    normal = monitoring.read_request_log(tmp_path / "none", T0, T0)  # empty
    assert normal.empty
    normal = _records(x[:400], champion["onnx"], classes, T0)
    import pandas as pd

    res = monitoring.check_served_drift(champion["reference"], pd.DataFrame(normal), tmp_path / "normal")
    assert res["status"] == "ok" and res["drift_detected"] is False, res["drifted_columns"]
    darker = (x[400:800].astype(np.float32) * 0.35).astype(np.uint8)
    shifted = _records(darker, champion["onnx"], classes, T0)
    res = monitoring.check_served_drift(champion["reference"], pd.DataFrame(shifted), tmp_path / "shifted")
    assert res["drift_detected"] is True and "brightness" in res["drifted_columns"]
    assert res["embedding_drift_score"] is not None
    assert (tmp_path / "shifted" / "served_drift.html").is_file()


def test_too_little_traffic_is_not_enough_data_not_an_alarm(tmp_path, champion, digits_snapshot):
    import pandas as pd

    x, _ = digits_snapshot.split("val")
    dark = (x[:20] // 4).astype(np.uint8)
    res = monitoring.check_served_drift(champion["reference"],
                                        pd.DataFrame(_records(dark, champion["onnx"], digits_snapshot.class_names, T0)),
                                        tmp_path, min_rows=100)
    assert res["status"] == "not_enough_data" and res["drift_detected"] is False and "fewer than" in res["message"]
