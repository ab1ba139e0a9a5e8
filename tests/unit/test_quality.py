"""Snapshot validation (Great Expectations) on real 8x8 digit images.

Fixtures ``quality_profile``, ``quality_manifest``, ``quality_digits`` and
``quality_make_profile`` live in ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import json

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
    result = validate_snapshot(quality_profile, quality_manifest, quality_config, tmp_path)

    assert result["success"] is True, result["failures"]
    assert result["failed"] == 0 and result["failures"] == []
    assert result["evaluated"] >= 25  # one not-null check per column plus the rest
    stats = result["statistics"]
    assert stats["rows"] == len(quality_profile) == 1797
    assert stats["undecodable"] == 0 and stats["train_test_overlap"] == 0 and stats["conflicting_labels"] == 0
    assert stats["appearance_outliers"] == 0 and result["warnings"] == []
    assert [(a["check"], a["outliers"], a["passed"]) for a in result["appearance"]] == [
        ("brightness_range", 0, True), ("min_contrast", 0, True)]
    assert set(stats["per_class_train"]) == {str(i) for i in range(10)}

    report = json.loads((tmp_path / "validation.json").read_text())
    assert result["report_path"] == str(tmp_path / "validation.json")
    assert report["summary"]["success"] is True
    assert set(report["gx_results"]) == {
        "profile", "undecodable_files", "train_class_counts", "train_test_overlap", "conflicting_labels"}
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
        "2 source file(s) could not be read or decoded: incoming/cat.png (cannot identify image file), "
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
    test = quality_profile.index[quality_profile["split"] == "test"][:3]
    train = [quality_profile.index[(quality_profile["split"] == "train")
                                   & (quality_profile["label"] == quality_profile.loc[t, "label"])][0] for t in test]
    quality_profile.loc[test, "sha256"] = quality_profile.loc[train, "sha256"].to_numpy()  # same label: no conflict
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
    strict = ValidationConfig(class_names=None, image_shape=(8, 8, 1), max_outlier_share=0)
    result = validate_snapshot(profile, quality_manifest, strict, tmp_path)

    b = _failure(result, "brightness_range")
    assert b["kind"] == "appearance"
    assert b["summary"] == (
        "2 of 1797 images (0.111%) have brightness outside [5, 250]: digits:10 (0), digits:11 (255); "
        "more than the 0% (0 of 1797) tolerated (max_outlier_share=0)"
    )
    c = _failure(result, "min_contrast")
    assert c["summary"].startswith("3 of 1797 images (0.167%) have contrast (pixel std) below 1")
    assert "digits:10 (0), digits:11 (0), digits:12 (0);" in c["summary"]
    assert [r["source"] for r in c["details"]] == ["digits:10", "digits:11", "digits:12"]
    assert _checks(result) == {"brightness_range", "min_contrast"}

    # the default tolerates a few outliers (2%) and still lists them
    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    assert result["success"] is True, result["failures"]
    assert result["statistics"]["appearance_outliers"] == 3
    bright = result["appearance"][0]
    assert bright["check"] == "brightness_range" and bright["passed"] is True and bright["outliers"] == 2
    assert [(i["index"], i["source"], i["value"]) for i in bright["images"]] == [(10, "digits:10", 0.0),
                                                                             (11, "digits:11", 255.0)]
    assert len(result["warnings"]) == 2 and "digits:12 (0)" in result["warnings"][1]


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
        "expect_table_row_count_to_equal: 1 source file(s) could not be read or decoded: x/broken.png (bad header)"
        in message
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
    for share in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="max_outlier_share"):
            ValidationConfig(class_names=None, image_shape=(8, 8, 1), max_outlier_share=share)
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
    from nightshift.data.collect import collect_imagefolder

    root = tmp_path / "photos"
    _write_jpegs(root)
    config = ValidationConfig(class_names=["0", "1", "2"], image_shape=(8, 8, 1), min_rows=30, min_per_class=5)

    def collect_and_validate(name):
        snap, _ = collect_imagefolder(root, (8, 8, 1), tmp_path / "snapshots", workers=1, incremental=False)
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


def _with_bright_images(profile, indices, value=250.2):
    """The profile with the images at ``indices`` as bright as the sky crop of issue 19 (mean 250.2)."""
    profile = profile.copy()
    profile.loc[list(indices), "brightness"] = value
    return profile


def test_one_bright_image_is_listed_but_does_not_fail_the_dataset(
    quality_profile, quality_manifest, quality_config, tmp_path
):
    """Item 8: one legitimate bright photo (a sky crop, a product on white) must not veto the dataset."""
    profile = _with_bright_images(quality_profile, [42])
    brightness = 250.2

    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    assert result["success"] is True, result["failures"]
    raise_for_failures(result)
    bright = next(a for a in result["appearance"] if a["check"] == "brightness_range")
    assert bright["passed"] is True and bright["outliers"] == 1 and bright["rows"] == 1797
    assert bright["range"] == [5.0, 250.0] and bright["max_share"] == 0.02 and bright["allowed"] == 35
    assert bright["images"] == [{"index": 42, "image_id": int(profile.loc[42, "image_id"]), "source": "digits:42",
                                 "value": round(brightness, 4)}]
    assert result["warnings"] == [f"tolerated appearance outliers: {bright['summary']}"]
    assert bright["summary"].startswith(
        "1 of 1797 images (0.0556%) have brightness outside [5, 250]: digits:42 (250.2)")
    assert "within the 2% (35 of 1797) tolerated" in bright["summary"]
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["summary"]["appearance"][0]["images"][0]["source"] == "digits:42"  # the view reads this


def test_many_bright_images_still_fail(quality_profile, quality_manifest, quality_config, tmp_path):
    """Item 8: past the share set in the suite, appearance outliers do fail the run (30% here)."""
    n = len(quality_profile)
    bright_rows = list(range(0, n, 3))[: int(0.3 * n)]
    profile = _with_bright_images(quality_profile, bright_rows, value=253.0)

    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    assert result["success"] is False
    f = _failure(result, "brightness_range")
    assert f["kind"] == "appearance" and f["observed"]["unexpected_count"] == len(bright_rows)
    assert f["summary"].startswith(f"{len(bright_rows)} of {n} images (30%) have brightness outside [5, 250]: ")
    assert "more than the 2% (35 of 1797) tolerated (max_outlier_share=0.02)" in f["summary"]
    bright = next(a for a in result["appearance"] if a["check"] == "brightness_range")
    assert bright["passed"] is False and bright["outliers"] == len(bright_rows)
    assert bright["listed"] == 100 and len(bright["images"]) == 100  # the report lists at most OUTLIER_LIST
    with pytest.raises(ValidationFailed, match="brightness outside"):
        raise_for_failures(result)

    # the share is configurable: a suite that tolerates 35% passes the same data
    lenient = ValidationConfig(class_names=None, image_shape=(8, 8, 1), max_outlier_share=0.35)
    assert validate_snapshot(profile, quality_manifest, lenient, tmp_path)["success"] is True


def test_outlier_share_boundary_is_inclusive(quality_profile, quality_manifest, tmp_path):
    """Exactly the tolerated share passes; one more image fails (no float rounding at the boundary)."""
    head = quality_profile.head(100)  # 100 images: 2% = 2
    profile2 = _with_bright_images(head, [1, 2])
    profile3 = _with_bright_images(head, [1, 2, 3])
    config = ValidationConfig(class_names=None, image_shape=(8, 8, 1), min_per_class=1)
    assert config.allowed_outliers(100) == 2 and config.allowed_outliers(50) == 1
    assert validate_snapshot(profile2, quality_manifest, config, tmp_path)["success"] is True
    result = validate_snapshot(profile3, quality_manifest, config, tmp_path)
    assert _checks(result) == {"brightness_range"}


def test_conflicting_labels_on_identical_pixels_fail(quality_digits, quality_make_profile, quality_manifest,
                                                     quality_config, tmp_path):
    """Item 11: the same pixels under two class folders is an integrity failure naming both files and labels."""
    d = quality_digits
    images = d["images"].copy()
    labels = d["labels"].copy()
    three = int(np.flatnonzero(labels == 3)[0])
    five = int(np.flatnonzero(labels == 5)[0])
    images[five] = images[three]  # the same picture filed under "5" too
    splits = d["splits"].copy()
    splits[five] = splits[three]  # identical pixels share a split, as the snapshot code assigns them
    sources = [f"{lab}/{i:04d}.png" for i, lab in enumerate(labels)]
    profile = quality_make_profile(images, labels, splits, d["class_names"], sources)

    result = validate_snapshot(profile, quality_manifest, quality_config, tmp_path)
    assert result["success"] is False
    f = _failure(result, "no_conflicting_labels")
    assert f["kind"] == "integrity" and f["observed"] == 1
    sha = profile.loc[three, "sha256"]
    assert f["summary"] == (
        f"1 image(s) have identical pixels under different labels (2 files): "
        f"{sha[:12]} (3/{three:04d}.png as '3', 5/{five:04d}.png as '5')"
    )
    assert f["details"] == [{"sha256": sha, "labels": ["3", "5"], "images": [
        {"source": f"3/{three:04d}.png", "index": three, "label": "3"},
        {"source": f"5/{five:04d}.png", "index": five, "label": "5"}]}]
    assert result["statistics"]["conflicting_labels"] == 1
    with pytest.raises(ValidationFailed, match="identical pixels under different labels"):
        raise_for_failures(result)

    # the same pixels twice under ONE label are duplicates, not a conflict
    labels_same = labels.copy()
    labels_same[five] = 3
    profile = quality_make_profile(images, labels_same, splits, d["class_names"], sources)
    assert "no_conflicting_labels" not in _checks(validate_snapshot(profile, quality_manifest, quality_config,
                                                                    tmp_path))


def test_the_nightshift_view_shows_the_outliers_of_a_versions_validation(quality_profile, quality_manifest,
                                                                         quality_config, tmp_path):
    """Item 8: the outliers a passing validation tolerated are visible where a person looks: the view
    reads them from the run's validation report and lists the images with their values."""
    from types import SimpleNamespace

    from nightshift.artifacts import run_dir
    from nightshift.ui import data as view_data
    from nightshift.ui.app import _jinja

    root = tmp_path / "artifacts"
    run_id = "scheduled__2026-12-01T02:00:00+00:00"
    profile = _with_bright_images(quality_profile, [42])
    report_dir = run_dir(root, "nightly_retrain", run_id) / "validation"
    validate_snapshot(profile, quality_manifest, quality_config, report_dir)

    outliers = view_data.validation_outliers(root, run_id)
    assert outliers is not None and outliers["outliers"] == 1
    bright = outliers["checks"][0]
    assert bright["check"] == "brightness_range" and bright["range"] == "[5, 250]" and bright["passed"] is True
    assert bright["images"][0]["source"] == "digits:42" and bright["images"][0]["value"] == 250.2
    assert view_data.validation_outliers(root, "manual__no_such_run") is None

    mv = SimpleNamespace(version="3", tags={"nightshift.dag_run": run_id}, run_id=None, creation_timestamp=None)
    version = view_data.version_view(root, "m", mv, {})
    assert version["validation"] == outliers
    overview = {"generated": "now", "mlflow_ui_url": "http://x", "models": [
        {"name": "m", "versions": [version], "n_versions": 1, "history": [], "drift": []}]}
    html = _jinja().get_template("view.html").render(o=overview, user="")
    assert "1 appearance outlier<" in html
    assert "brightness [5, 250]: 1 (0.0556% of images; tolerated at ≤ 2%)" in html
    assert "digits:42 = 250.2" in html
