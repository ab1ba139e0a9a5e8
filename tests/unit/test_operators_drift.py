"""DriftCheckOperator (nightshift.operators.drift): without a champion, against one, and with a
champion reference it cannot read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nightshift.operators import (
    PromoteModelOperator,
)

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_drift_check_without_champion_then_against_it(ctx, candidate):
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftCheckOperator

    first = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert first["status"] == "no_reference" and first["drift_detected"] is False
    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    second = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert second["status"] == "ok" and second["drift_detected"] is False and second["drifted_share"] == 0.0
    assert second["champion_version"] == "1"
    assert Path(second["report_html"]).is_file()


def test_drift_check_with_an_unreadable_champion_reference_reports_it_and_goes_on(ctx, candidate, tmp_path):
    import json as _json

    from nightshift import registry
    from nightshift.gates import THRESHOLD_KEYS
    from nightshift.operators import DriftCheckOperator

    loose = dict.fromkeys(THRESHOLD_KEYS, 0.0) | {"min_accuracy": 0.1, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 100.0}
    out = PromoteModelOperator(task_id="promote", model_name="op-promote", thresholds=loose, gates_file="", **candidate).execute(ctx)
    old = tmp_path / "format1"
    old.mkdir()
    (old / "manifest.json").write_text(_json.dumps({"format": 1, "digest": "x"}))  # an older Nightshift's snapshot
    c = registry.client(f"sqlite:///{os.environ['NIGHTSHIFT_HOME']}/mlflow.db")
    c.set_model_version_tag("op-promote", out["version"], "nightshift.snapshot_uri", str(old))
    res = DriftCheckOperator(task_id="drift", snapshot=candidate["snapshot"], model_name="op-promote").execute(ctx)
    assert res["status"] == "reference_unavailable" and "format 1" in res["message"]
    assert res["drift_detected"] is False and res["champion_version"] == out["version"]
