"""Snapshot validation (Great Expectations) on real 8x8 digit images.

Fixtures ``quality_profile``, ``quality_manifest``, ``quality_digits`` and
``quality_make_profile`` live in ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from nightshift.errors import ConfigError, ValidationFailed
from nightshift.quality import ValidationConfig, raise_for_failures, validate_snapshot


@pytest.fixture
def quality_config() -> ValidationConfig:
    return ValidationConfig(class_names=None, image_shape=(8, 8, 1))


def _failure(result: dict, check: str) -> dict:
    found = [f for f in result["failures"] if f["check"] == check]
    assert found, f"expected a failed {check!r} check, got {[f['check'] for f in result['failures']]}"
    return found[0]


def _checks(result: dict) -> set[str]:
    return {f["check"] for f in result["failures"]}


def test_clean_data_passes_and_writes_report(quality_profile, quality_manifest, quality_config, tmp_path):
    started = time.perf_counter()
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)
    elapsed = time.perf_counter() - started

    assert result["success"] is True, result["failures"]
    assert result["failed"] == 0 and result["failures"] == []
    assert result["evaluated"] >= 25  # one not-null check per column plus the rest
    stats = result["statistics"]
    assert stats["rows"] == len(quality_profile) == 1797
    assert stats["undecodable"] == 0 and stats["train_test_overlap"] == 0
    assert set(stats["per_class_train"]) == {str(i) for i in range(10)}
    assert elapsed < 30, f"validation of 1,797 rows took {elapsed:.1f}s"

    report = json.loads((tmp_path / "validation.json").read_text())
    assert result["report_path"] == str(tmp_path / "validation.json")
    assert report["summary"]["success"] is True
    assert set(report["gx_results"]) == {"profile", "undecodable_files", "train_class_counts", "train_test_overlap"}
    assert all(r["success"] for r in report["gx_results"].values())
    json.dumps(result, allow_nan=False)  # strictly JSON-safe
    raise_for_failures(result)  # no exception on success


def test_manifest_class_list_is_the_default_and_config_overrides_it(quality_profile, quality_manifest, tmp_path):
    config = ValidationConfig(class_names=[str(i) for i in range(11)], image_shape=(8, 8, 1))
    result = validate_snapshot(quality_profile, quality_manifest, config, tmp_path)
    f = _failure(result, "label_set")
    assert f["expectation"] == "expect_column_distinct_values_to_equal_set"
    assert f["observed"]["missing"] == ["10"]
    assert "classes with no images: 10" in f["summary"]
    assert "'10' (0)" in _failure(result, "min_per_class")["summary"]


def test_extra_class_name_is_detected(quality_profile, quality_manifest, quality_config, tmp_path):
    rows = quality_profile.index[quality_profile["label"] == 3][:4]
    quality_profile.loc[rows, "label_name"] = "three"
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)

    assert result["success"] is False
    f = _failure(result, "label_set")
    assert f["column"] == "label_name"
    assert f["observed"]["unexpected"] == ["three"]
    assert "not in the class list: three" in f["summary"]
    pair = _failure(result, "label_name_matches_label")
    assert pair["summary"].startswith("4 of 1797 rows have a (label, label_name) pair")


def test_missing_class_is_detected(quality_profile, quality_manifest, quality_config, tmp_path):
    profile = quality_profile[quality_profile["label"] != 9]
    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)

    assert "classes with no images: 9" in _failure(result, "label_set")["summary"]
    per_class = _failure(result, "min_per_class")
    assert per_class["summary"] == "1 of 10 classes have fewer than 5 train images: '9' (0)"
    assert per_class["observed"]["9"] == 0


def test_label_out_of_range(quality_profile, quality_manifest, quality_config, tmp_path):
    quality_profile.loc[[5, 6], "label"] = 12
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)
    f = _failure(result, "label_range")
    assert f["summary"].startswith("2 of 1797 rows have label outside [0, 9] (values 12): digits:5, digits:6")


def test_nulls_are_detected_per_column(quality_profile, quality_manifest, quality_config, tmp_path):
    quality_profile.loc[7, "brightness"] = np.nan
    quality_profile.loc[[8, 9], "label_name"] = None
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)

    b = _failure(result, "not_null:brightness")
    assert b["expectation"] == "expect_column_values_to_not_be_null" and b["column"] == "brightness"
    assert b["summary"] == "1 of 1797 rows have a null brightness: digits:7"
    n = _failure(result, "not_null:label_name")
    assert n["summary"] == "2 of 1797 rows have a null label_name: digits:8, digits:9"
    assert n["observed"]["unexpected_count"] == 2
    json.dumps(result, allow_nan=False)


def test_undecodable_files_are_listed(quality_profile, quality_manifest, quality_config, tmp_path):
    quality_manifest["undecodable"] = [
        {"path": "incoming/cat.png", "error": "cannot identify image file"},
        {"path": "incoming/half.jpg", "error": "image file is truncated"},
    ]
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)
    f = _failure(result, "no_undecodable")
    assert f["expectation"] == "expect_table_row_count_to_equal"
    assert f["observed"] == 2
    assert f["summary"] == (
        "2 source file(s) could not be decoded: incoming/cat.png (cannot identify image file), "
        "incoming/half.jpg (image file is truncated)"
    )
    assert f["details"][0] == {"path": "incoming/cat.png", "error": "cannot identify image file"}
    assert _checks(result) == {"no_undecodable"}


def test_wrong_shape_is_detected(quality_profile, quality_manifest, quality_config, tmp_path):
    quality_profile.loc[[1, 2, 3], "height"] = 16
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)
    f = _failure(result, "shape:height")
    assert f["column"] == "height"
    assert f["summary"] == (
        "3 of 1797 rows have height != 8 (configured shape 8x8x1) (values 16): digits:1, digits:2, digits:3"
    )
    assert _checks(result) == {"shape:height"}

    rgb = ValidationConfig(class_names=None, image_shape=(8, 8, 3))
    result = validate_snapshot(quality_profile, quality_manifest, rgb, tmp_path)
    assert "1797 of 1797 rows have channels != 3" in _failure(result, "shape:channels")["summary"]
    assert "mean_ch1, mean_ch2" in _failure(result, "schema")["summary"]


def test_class_below_minimum_is_detected(quality_profile, quality_manifest, quality_config, tmp_path):
    fives = quality_profile.index[(quality_profile["label"] == 5) & (quality_profile["split"] == "train")]
    profile = quality_profile.drop(fives[2:])
    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    f = _failure(result, "min_per_class")
    assert f["expectation"] == "expect_column_values_to_be_between"
    assert f["summary"] == "1 of 10 classes have fewer than 5 train images: '5' (2)"
    assert f["details"] == [{"label_name": "5", "count": 2}]
    assert _checks(result) == {"min_per_class"}


def test_train_test_duplicate_is_detected(quality_profile, quality_manifest, quality_config, tmp_path):
    train = quality_profile.index[quality_profile["split"] == "train"][:3]
    test = quality_profile.index[quality_profile["split"] == "test"][:3]
    quality_profile.loc[test, "sha256"] = quality_profile.loc[train, "sha256"].to_numpy()
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)

    f = _failure(result, "no_train_test_overlap")
    assert f["observed"] == 3
    assert f["summary"].startswith("3 test image(s) also appear in train (3 distinct sha256): ")
    first_hash = quality_profile.loc[train[0], "sha256"][:12]
    first_test = quality_profile.loc[test[0], "source"]
    first_train = quality_profile.loc[train[0], "source"]
    assert f"{first_hash} (test {first_test} = train {first_train})" in f["summary"]
    assert result["statistics"]["train_test_overlap"] == 3
    assert _checks(result) == {"no_train_test_overlap"}


def test_blank_images_fail_brightness_and_contrast(
    quality_digits, quality_make_profile, quality_manifest, quality_config, tmp_path
):
    images = quality_digits["images"].copy()
    images[10] = 0  # black frame
    images[11] = 255  # white frame
    images[12] = 128  # flat grey: brightness fine, no contrast
    d = quality_digits
    profile = quality_make_profile(images, d["labels"], d["splits"], d["class_names"])
    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)

    b = _failure(result, "brightness_range")
    assert b["summary"] == "2 of 1797 rows have brightness outside [5, 250] (values 0, 255): digits:10, digits:11"
    c = _failure(result, "min_contrast")
    assert c["summary"].startswith("3 of 1797 rows have contrast (pixel std) below 1")
    assert c["summary"].endswith("digits:10, digits:11, digits:12")
    assert [r["source"] for r in c["details"]] == ["digits:10", "digits:11", "digits:12"]

    lenient = ValidationConfig(class_names=None, image_shape=(8, 8, 1), mostly=0.99)
    assert validate_snapshot(profile, quality_manifest, lenient, tmp_path)["success"] is True


def test_too_few_rows_and_missing_column(quality_profile, quality_manifest, quality_config, tmp_path):
    profile = quality_profile.head(20).drop(columns=["contrast"])
    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    assert _failure(result, "min_rows")["summary"] == "profile has 20 rows (decoded images); at least 50 required"
    schema = _failure(result, "schema")
    assert schema["observed"] == ["contrast"]
    assert "lacks required column(s) contrast" in schema["summary"]


def test_raise_for_failures_lists_every_failure(quality_profile, quality_manifest, quality_config, tmp_path):
    quality_profile.loc[0, "height"] = 9
    quality_manifest["undecodable"] = [{"path": "x/broken.png", "error": "bad header"}]
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)
    assert result["failed"] == 2

    with pytest.raises(ValidationFailed) as info:
        raise_for_failures(result)
    err = info.value
    assert err.failures == result["failures"]
    assert err.report_path == str(tmp_path / "validation.json")
    message = str(err)
    assert message.startswith("2 expectation(s) failed:")
    assert "expect_column_values_to_be_in_set [height]: 1 of 1797 rows have height != 8" in message
    assert (
        "expect_table_row_count_to_equal: 1 source file(s) could not be decoded: x/broken.png (bad header)" in message
    )
    assert f"full result: {tmp_path / 'validation.json'}" in message

    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["summary"]["failed"] == 2
    assert saved["gx_results"]["profile"]["success"] is False


def test_config_errors(quality_profile, quality_manifest, tmp_path):
    with pytest.raises(ConfigError, match="image_shape"):
        ValidationConfig(class_names=None, image_shape=(8, 8))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="brightness_range"):
        ValidationConfig(class_names=None, image_shape=(8, 8, 1), brightness_range=(200, 100))
    with pytest.raises(ConfigError, match="mostly"):
        ValidationConfig(class_names=None, image_shape=(8, 8, 1), mostly=0)
    assert ValidationConfig(class_names=None, image_shape=[8, 8, 1]).image_shape == (8, 8, 1)  # type: ignore[arg-type]

    manifest = dict(quality_manifest, class_names=None)
    config = ValidationConfig(class_names=None, image_shape=(8, 8, 1))
    with pytest.raises(ConfigError, match="no class list"):
        validate_snapshot(quality_profile, manifest, config, tmp_path)


def _write_jpegs(root, per_class=20):
    """A small ImageFolder of real digit photos saved as JPEG (RGB 24×24)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for cls in ("0", "1", "2"):
        for i in np.flatnonzero(digits.target == int(cls))[:per_class]:
            g = np.kron(np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8), np.ones((3, 3), np.uint8))
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([g, g, g], axis=2)).save(root / cls / f"{i:04d}.jpg", quality=90)


def test_each_collection_reports_its_own_undecodable_files(tmp_path):
    """Clean → dirty → clean again on the same ImageFolder: the pixels of all three
    collections are identical, yet each validation sees exactly its own bad files."""
    from nightshift.data import sources
    from nightshift.data.snapshot import write_snapshot

    root = tmp_path / "photos"
    _write_jpegs(root)
    config = ValidationConfig(class_names=["0", "1", "2"], image_shape=(8, 8, 1), min_rows=30, min_per_class=5)

    def collect_and_validate(name):
        snap = write_snapshot(sources.load_imagefolder(root, (8, 8, 1)), tmp_path / "snapshots")
        return snap, validate_snapshot(snap.profile(), snap.manifest, config, tmp_path / name)

    clean, result = collect_and_validate("v1")
    assert result["success"] is True, result["failures"]
    assert clean.manifest["undecodable"] == []

    good = sorted((root / "1").glob("*.jpg"))[0].read_bytes()
    (root / "1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "2" / "notes.jpg").write_text("a text file with a .jpg name")
    dirty, result = collect_and_validate("v2")
    assert dirty.digest == clean.digest  # the decodable pixels did not change ...
    assert {u["path"] for u in dirty.manifest["undecodable"]} == {"1/truncated.jpg", "2/notes.jpg"}  # ... the facts did
    assert result["success"] is False
    with pytest.raises(ValidationFailed) as exc:
        raise_for_failures(result)
    assert "1/truncated.jpg" in str(exc.value) and "2/notes.jpg" in str(exc.value)

    (root / "1" / "truncated.jpg").unlink()
    (root / "2" / "notes.jpg").unlink()
    again, result = collect_and_validate("v3")
    assert again.digest == clean.digest and again.collection_id not in (clean.collection_id, dirty.collection_id)
    assert again.manifest["undecodable"] == [] and result["success"] is True, result["failures"]
