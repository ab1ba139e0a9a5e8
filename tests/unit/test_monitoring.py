"""Drift monitoring of served traffic on real digits through a real ONNX model."""

from __future__ import annotations

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
