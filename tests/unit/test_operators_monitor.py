"""DriftMonitorOperator (nightshift.operators.monitor): skips without a champion, then compares the
served traffic with the champion's reference."""

from __future__ import annotations

import json

import pytest

from nightshift.operators import (
    PromoteModelOperator,
)

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_drift_monitor_skips_without_champion_then_compares_served_traffic(ctx, candidate, tmp_path):
    from datetime import datetime, timedelta, timezone

    import numpy as np
    from airflow.sdk.exceptions import AirflowSkipException

    from nightshift import contracts, state
    from nightshift.data.snapshot import load_snapshot
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftMonitorOperator
    from tests.unit.served_traffic import served_records

    t0 = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)
    window = {"window_start": t0.isoformat(), "window_end": (t0 + timedelta(hours=1)).isoformat()}
    op = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, **window)
    with pytest.raises(AirflowSkipException, match="no champion"):
        op.execute(ctx)
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    snap = load_snapshot(candidate["snapshot"]["snapshot_uri"])
    x, _ = snap.split("train")
    dark = (x[np.random.default_rng(1).permutation(len(x))[:300]] // 3).astype(np.uint8)
    version = candidate["export"]["onnx_sha256"][:12]
    recs = served_records(dark, candidate["export"]["onnx_path"], snap.class_names, t0 + timedelta(minutes=1),
                          version=version)
    recs[0]["model_version"] = "an-older-champion"
    log_dir = contracts.request_log_dir(op.settings.artifact_root, "op-promote")
    log_dir.mkdir(parents=True)
    (log_dir / "requests-1.jsonl").write_text("".join(json.dumps(r | {"model_name": "op-promote"}) + "\n"
                                                      for r in recs))
    out = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, **window).execute(ctx)
    assert out["status"] == "ok" and out["drift_detected"] is True and out["n_current"] == 299
    assert out["served_versions"] == {version: 299, "an-older-champion": 1}
    timeline = list(state.read_jsonl(contracts.drift_timeline_path(op.settings.artifact_root, "op-promote")))
    assert timeline[-1]["drift_detected"] is True and timeline[-1]["champion_version"] == "1"
    # an hour whose traffic all came from another model: not enough data, and the reason says so
    later = t0 + timedelta(hours=1)
    (log_dir / "requests-2.jsonl").write_text("".join(
        json.dumps(r | {"model_name": "op-promote", "model_version": "an-older-champion"}) + "\n"
        for r in served_records(dark[:80], candidate["export"]["onnx_path"], snap.class_names,
                                later + timedelta(minutes=1), version="an-older-champion")))
    quiet = DriftMonitorOperator(task_id="monitor", model_name="op-promote", min_rows=50, window_start=later.isoformat(),
                                 window_end=(later + timedelta(hours=1)).isoformat()).execute(ctx)
    assert quiet["status"] == "not_enough_data" and quiet["served_versions"] == {"an-older-champion": 80}
    assert "80 other request(s)" in quiet["message"] and "an-older-champion" in quiet["message"]
    assert version in quiet["message"] and "serving the champion" in quiet["message"]
    timeline = list(state.read_jsonl(contracts.drift_timeline_path(op.settings.artifact_root, "op-promote")))
    assert timeline[-1]["status"] == "not_enough_data" and "an-older-champion" in timeline[-1]["message"]
