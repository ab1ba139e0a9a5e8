"""Drift detection (Evidently) on profiles of real 8x8 digit images.

Uses the ``quality_digits`` / ``quality_make_profile`` / ``quality_profile``
fixtures from ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from nightshift.drift import check_drift, drift_columns
from nightshift.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def drift_halves(quality_digits):
    """Two disjoint random halves of the digits (indices), stratified by label, fixed seed.

    Stratified because Evidently's chi-square test takes the reference frequencies as the
    expected ones, so two plain random halves often differ "significantly" in label mix.
    """
    rng = np.random.default_rng(7)
    labels = quality_digits["labels"]
    first, second = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _profile(digits, make, idx, images=None):
    images = digits["images"] if images is None else images
    return make(
        images[idx],
        digits["labels"][idx],
        digits["splits"][idx],
        digits["class_names"],
        sources=[f"digits:{i}" for i in idx],
    )


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_drift_columns(quality_profile):
    assert drift_columns(quality_profile) == ["brightness", "contrast", "mean_ch0"]
    rgb = pd.DataFrame(columns=["mean_ch2", "contrast", "mean_ch10", "brightness", "mean_ch0", "mean_ch1", "label"])
    assert drift_columns(rgb) == ["brightness", "contrast", "mean_ch0", "mean_ch1", "mean_ch2", "mean_ch10"]
    with pytest.raises(DataError, match="brightness"):
        drift_columns(quality_profile.drop(columns=["brightness"]))


def test_same_distribution_has_no_drift(quality_digits, quality_make_profile, drift_halves, tmp_path):
    ref_idx, cur_idx = drift_halves
    reference = _profile(quality_digits, quality_make_profile, ref_idx)
    current = _profile(quality_digits, quality_make_profile, cur_idx)

    result = check_drift(reference, current, tmp_path)

    assert result["status"] == "ok"
    assert result["drift_detected"] is False
    assert set(result["columns"]) == {"brightness", "contrast", "mean_ch0", "label_name"}
    assert result["n_columns"] == 4
    assert result["n_drifted"] == sum(v["drifted"] for v in result["columns"].values())
    assert result["drifted_share"] == pytest.approx(result["n_drifted"] / 4)
    assert result["drifted_share"] < 0.5
    assert not result["columns"]["brightness"]["drifted"]
    assert not result["columns"]["label_name"]["drifted"]
    for col in result["columns"].values():
        assert isinstance(col["score"], float) and isinstance(col["method"], str) and col["method"]
    assert result["columns"]["label_name"]["type"] == "categorical"
    assert result["n_reference"] == len(ref_idx) and result["n_current"] == len(cur_idx)

    html = tmp_path / "drift_report.html"
    assert result["report_html"] == str(html) and html.stat().st_size > 10_000
    assert "<html" in html.read_text(encoding="utf-8")[:2000].lower()
    saved = _read_json(result["report_json"])
    assert saved["summary"]["drift_detected"] is False
    assert saved["summary"]["columns"] == result["columns"]
    assert any("ValueDrift" in m["config"]["type"] for m in saved["evidently"]["metrics"])
    json.dumps(result, allow_nan=False)


def test_brightened_images_drift(quality_digits, quality_make_profile, drift_halves, tmp_path):
    ref_idx, cur_idx = drift_halves
    brighter = np.clip(quality_digits["images"].astype(np.int16) + 60, 0, 255).astype(np.uint8)
    reference = _profile(quality_digits, quality_make_profile, ref_idx)
    current = _profile(quality_digits, quality_make_profile, cur_idx, images=brighter)

    result = check_drift(reference, current, tmp_path)

    assert result["status"] == "ok"
    assert result["drift_detected"] is True
    assert result["columns"]["brightness"]["drifted"] is True
    assert result["columns"]["mean_ch0"]["drifted"] is True
    assert "brightness" in result["drifted_columns"]
    assert result["drifted_share"] >= 0.5
    assert not result["columns"]["label_name"]["drifted"]  # same labels, only pixels changed
    assert _read_json(result["report_json"])["summary"]["drift_detected"] is True


def test_large_samples_use_distance_methods(quality_digits, quality_make_profile, quality_profile, tmp_path):
    """Above 1,000 rows Evidently switches from p-values to distances; the verdicts must still be right."""
    same = check_drift(quality_profile, quality_profile.copy(), tmp_path / "same")
    assert same["drift_detected"] is False and same["n_drifted"] == 0

    brighter = np.clip(quality_digits["images"].astype(np.int16) + 60, 0, 255).astype(np.uint8)
    idx = np.arange(len(brighter))
    shifted = check_drift(
        quality_profile, _profile(quality_digits, quality_make_profile, idx, images=brighter), tmp_path / "shifted"
    )
    assert shifted["drift_detected"] is True
    assert shifted["columns"]["brightness"]["drifted"] is True
    assert "p_value" not in shifted["columns"]["brightness"]["method"]


def test_threshold_controls_dataset_verdict(quality_digits, quality_make_profile, drift_halves, tmp_path):
    ref_idx, cur_idx = drift_halves
    brighter = np.clip(quality_digits["images"].astype(np.int16) + 60, 0, 255).astype(np.uint8)
    reference = _profile(quality_digits, quality_make_profile, ref_idx)
    current = _profile(quality_digits, quality_make_profile, cur_idx, images=brighter)
    strict = check_drift(reference, current, tmp_path, drift_share_threshold=1.0)
    assert strict["drift_detected"] is (strict["n_drifted"] == strict["n_columns"])


def test_no_reference_is_not_a_failure(quality_profile, tmp_path):
    result = check_drift(None, quality_profile, tmp_path / "drift")
    assert result["status"] == "no_reference"
    assert result["drift_detected"] is False
    assert result["drifted_share"] is None
    assert result["report_html"] is None
    assert result["n_current"] == len(quality_profile)
    saved = _read_json(result["report_json"])
    assert saved["summary"]["status"] == "no_reference"
    assert not (tmp_path / "drift" / "drift_report.html").exists()


def test_bad_inputs(quality_profile, tmp_path):
    with pytest.raises(DataError, match="current profile is empty"):
        check_drift(quality_profile, quality_profile.iloc[:0], tmp_path)
    with pytest.raises(DataError, match="reference profile is empty"):
        check_drift(quality_profile.iloc[:0], quality_profile, tmp_path)
    with pytest.raises(ConfigError, match="drift_share_threshold"):
        check_drift(quality_profile, quality_profile, tmp_path, drift_share_threshold=0)
