"""The Assets (nightshift.operators.assets): one drift Asset per model, the default model's the
one ``nightly_retrain`` has always been scheduled on."""

from __future__ import annotations

from nightshift.operators.assets import DRIFT_DETECTED_ASSET, SNAPSHOT_ASSET, drift_asset


def test_the_default_model_keeps_the_original_drift_asset():
    assert drift_asset() is DRIFT_DETECTED_ASSET and drift_asset(None) is DRIFT_DETECTED_ASSET


def test_every_other_model_has_a_drift_asset_of_its_own():
    a, b = drift_asset("cats"), drift_asset("dogs")
    assert (a.name, a.uri) == ("nightshift_drift_detected__cats", "nightshift://drift-detected/cats")
    assert len({a.uri, b.uri, DRIFT_DETECTED_ASSET.uri, SNAPSHOT_ASSET.uri}) == 4
    assert drift_asset("cats") == a  # the same Asset on every parse
