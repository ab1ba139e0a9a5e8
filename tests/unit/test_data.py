from __future__ import annotations

import numpy as np
import pytest

from nightshift.data import sources
from nightshift.data.collect import collect_imagefolder
from nightshift.data.snapshot import assign_splits, load_snapshot, pixel_hashes, write_snapshot
from nightshift.errors import ConfigError, DataError


def test_bundled_digits_are_real_uint8_images():
    data = sources.load_bundled()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert sorted(set(data.labels.tolist())) == list(range(10))
    assert data.class_names == [str(i) for i in range(10)]


def test_shards_are_shared_but_every_collection_has_its_own_record(tmp_path):
    data = sources.load_bundled()
    a = write_snapshot(data, tmp_path)
    b = write_snapshot(data, tmp_path)
    assert a.digest == b.digest and a.shard_digests == b.shard_digests  # pixel data stored once
    assert a.path != b.path and a.collection_id != b.collection_id  # per-collection facts never shared
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(set(a.shard_digests))  # no temp leftovers
    assert sorted(p.name for p in (tmp_path / "collections").iterdir()) == sorted([a.collection_id, b.collection_id])
    assert np.array_equal(a.images, b.images)
    changed = sources.load_bundled()
    changed.images[0, 0, 0, 0] ^= 1
    assert write_snapshot(changed, tmp_path).digest != a.digest


def test_small_shards_split_the_data_and_read_back_in_order(tmp_path):
    data = sources.load_bundled()
    snap = write_snapshot(data, tmp_path, shard_mb=16 * 1024 / 2**20)  # 16 KiB = 256 digits per shard
    assert [s["count"] for s in snap.manifest["shards"]] == [256] * 7 + [1797 - 7 * 256]
    assert np.array_equal(snap.images, data.images)
    parts = list(snap.iter_split("test"))
    assert 7 <= len(parts) <= 8 and sum(len(y) for _, y in parts) == snap.count("test")
    x, y = snap.split("test")
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    prof = snap.profile()
    assert prof["shard"].max() == 7 and (prof["row"] < 256).all()


def _collect(root, shape, snapshots, **kw):
    """An ImageFolder collected the way CollectDataOperator does (one decode process, nothing reused)."""
    snap, _ = collect_imagefolder(root, shape, snapshots, workers=1, incremental=False, **kw)
    return snap


def test_same_pixels_from_another_source_keep_that_source(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=6)
    first = _collect(root, (8, 8, 1), tmp_path / "snaps")
    moved = tmp_path / "moved"
    root.rename(moved)
    second = _collect(moved, (8, 8, 1), tmp_path / "snaps")
    assert second.digest == first.digest
    assert second.manifest["source"]["root"] == str(moved) != first.manifest["source"]["root"]
    assert second.profile()["source"].tolist() == first.profile()["source"].tolist()  # relative origins
    assert second.manifest["collected_at"] >= first.manifest["collected_at"]


def test_missing_or_corrupt_shard_and_old_format_fail_clearly(tmp_path):
    import json
    import shutil

    from nightshift.data import shards

    snap = write_snapshot(sources.load_bundled(), tmp_path)
    digest = snap.shard_digests[0]
    images = tmp_path / "shards" / digest / "images.npy"
    arr = np.load(images)
    arr[0, 0, 0, 0] ^= 0xFF
    np.save(images, arr)
    shards._verified.clear()  # rewritten in place within the same clock tick: make sure it is checked again
    with pytest.raises(DataError, match=f"shard {digest} .* is corrupt"):
        load_snapshot(snap.path)
    shutil.rmtree(tmp_path / "shards" / digest)
    with pytest.raises(DataError, match=f"shard {digest} is missing.*collect the data again"):
        load_snapshot(snap.path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": 1, "digest": "x"}))
    with pytest.raises(DataError, match="format 1.*re-run collect_data"):
        load_snapshot(old)


def test_a_shard_replaced_after_its_check_is_checked_again(tmp_path):
    """The verified-shard cache is keyed by the files' identity, not by the digest alone:
    a shard file replaced after a first successful open (restored from a bad backup, copied
    over) is hashed again and refused, not trusted from the earlier check."""
    import os

    snap = write_snapshot(sources.load_bundled(), tmp_path)
    load_snapshot(snap.path).shard(0)  # checked once, and cached
    digest = snap.shard_digests[0]
    images = tmp_path / "shards" / digest / "images.npy"
    arr = np.load(images)
    arr[0, 0, 0, 0] ^= 0xFF
    np.save(tmp_path / "bad.npy", arr)
    os.replace(tmp_path / "bad.npy", images)
    with pytest.raises(DataError, match=f"shard {digest} .* is corrupt"):
        load_snapshot(snap.path).shard(0)


def test_snapshot_contents_and_profile(digits_snapshot):
    snap = load_snapshot(digits_snapshot.path)
    m = snap.manifest
    assert m["counts"]["total"] == 1797 == sum(m["counts"]["per_split"].values())
    assert m["image_shape"] == [8, 8, 1] and m["undecodable"] == []
    assert 100 < m["counts"]["per_split"]["test"] < 300
    prof = snap.profile()
    assert len(prof) == 1797
    row = prof.iloc[5]
    img = snap.images[5]
    assert row["brightness"] == pytest.approx(img.mean(), rel=1e-5)
    assert row["contrast"] == pytest.approx(img.std(), rel=1e-4)
    assert row["mean_ch0"] == pytest.approx(img.mean(), rel=1e-5)
    assert row["label_name"] == str(snap.labels[5])
    x, y = snap.split("test")
    assert len(x) == len(y) == m["counts"]["per_split"]["test"] and x.dtype == np.uint8


def test_split_is_stable_as_data_grows_and_duplicates_share_a_split():
    data = sources.load_bundled()
    hashes = pixel_hashes(data.images)
    full = assign_splits(hashes, val_fraction=0.1, test_fraction=0.1)
    part = assign_splits(hashes[:500], val_fraction=0.1, test_fraction=0.1)
    assert (full[:500] == part).all()
    dup = assign_splits([hashes[0], hashes[0]], val_fraction=0.3, test_fraction=0.3)
    assert dup[0] == dup[1]
    with pytest.raises(DataError):
        assign_splits(hashes, val_fraction=0.6, test_fraction=0.5)


def test_imagefolder_converts_and_lists_undecodable(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=10, corrupt=2)
    (root / "1" / "notes.txt").write_text("not an image")
    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert snap.images.shape == (20, 8, 8, 1)
    assert snap.class_names == ["0", "1"]
    assert (snap.profile()[["orig_height", "orig_width", "orig_channels"]].to_numpy() == [16, 16, 3]).all()
    bad = {b["path"]: b["error"] for b in snap.manifest["undecodable"]}
    assert set(bad) == {"0/corrupt_0.png", "0/corrupt_1.png", "1/notes.txt"}
    assert "UnidentifiedImageError" in bad["0/corrupt_0.png"] or "cannot identify" in bad["0/corrupt_0.png"]


def test_imagefolder_rejects_unknown_class_and_missing_root(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1", "7"), per_class=3)
    with pytest.raises(DataError, match=r"\['7'\].*not in the configured classes"):
        _collect(root, (8, 8, 1), tmp_path / "snaps", class_names=["0", "1"])
    with pytest.raises(DataError, match="does not exist|not a directory"):
        _collect(tmp_path / "nope", (8, 8, 1), tmp_path / "snaps")


def test_imagefolder_through_object_storage_path(make_imagefolder, tmp_path):
    from airflow.sdk import ObjectStoragePath

    root = make_imagefolder(classes=("0", "1"), per_class=4)
    snap = _collect(ObjectStoragePath(f"file://{root}"), (8, 8, 3), tmp_path / "snaps")
    assert snap.images.shape == (8, 8, 8, 3)


def test_torchvision_fakedata_source():
    data = sources.load_torchvision("FakeData", "/nonexistent", (12, 12, 3), options={"size": 20, "num_classes": 4})
    assert data.images.shape[1:] == (12, 12, 3)
    assert set(data.predefined_split.tolist()) == {"train", "test"}
    with pytest.raises(ConfigError):
        sources.load_torchvision("NoSuchDataset", "/tmp", (8, 8, 1))


def test_torchvision_download_failure_is_explained(tmp_path):
    with pytest.raises(DataError, match="could not be loaded.*imagefolder"):
        sources.load_torchvision("MNIST", tmp_path, (28, 28, 1), download=False)


@pytest.mark.parametrize("raw,kind", [("bundled", "bundled"), ("/data/x", "imagefolder"),
                                      ("s3://bucket/prefix", "imagefolder"), ("imagefolder:./x", "imagefolder"),
                                      ("torchvision:CIFAR10", "torchvision")])
def test_parse_source(raw, kind):
    assert sources.parse_source(raw)["kind"] == kind


def test_parse_source_rejects_nonsense():
    with pytest.raises(ConfigError, match="not understood"):
        sources.parse_source("cifar please")


def test_to_shape_channel_conversions():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    gray = sources.to_shape(rgb, (4, 4, 1))
    assert gray.shape == (4, 4, 1) and int(gray[0, 0, 0]) == 76  # 0.299 * 255
    assert sources.to_shape(gray, (2, 2, 3)).shape == (2, 2, 3)


def test_truncated_image_is_listed_not_dropped(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=5)
    good = sorted((root / "1").iterdir())[0]
    data = good.read_bytes()
    (root / "1" / "truncated.png").write_bytes(data[: len(data) // 2])
    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert len(snap.images) == 10
    assert [b["path"] for b in snap.manifest["undecodable"]] == ["1/truncated.png"]
    assert "object at 0x" not in snap.manifest["undecodable"][0]["error"]


def test_imagefolder_does_not_follow_symlinks_out_of_the_root(make_imagefolder, tmp_path, caplog):
    """Item 11: a link (file or folder) that resolves outside the source root is not read: it is
    recorded with where it points, a warning is logged, and validation fails naming it; a link
    that stays inside the root is followed."""
    import logging

    from nightshift.quality import ValidationConfig, validate_snapshot

    root = make_imagefolder(classes=("0", "1"), per_class=30)
    private = make_imagefolder(classes=("8",), per_class=5, name="private")
    secret = sorted((private / "8").iterdir())[0]
    (root / "0" / "escape.png").symlink_to(secret)  # a file link out of the root
    (root / "8").symlink_to(private / "8", target_is_directory=True)  # a class folder link out of the root
    inside = sorted((root / "0").glob("0*.png"))[0]
    (root / "1" / "inside.png").symlink_to(inside)  # a link inside the root: fine
    (root / "1" / "dangling.png").symlink_to(root / "1" / "gone.png")  # points nowhere: reported, not a crash

    with caplog.at_level(logging.WARNING, logger="nightshift.data.sources"):
        listing = sources.list_imagefolder(root)
    skipped = {s["path"]: s["error"] for s in listing.skipped}
    assert set(skipped) == {"0/escape.png", "8/", "1/dangling.png"}
    assert skipped["0/escape.png"].startswith(f"symbolic link to {secret}, outside the source root {root}")
    assert "not followed" in skipped["8/"] and str(private / "8") in skipped["8/"]
    assert "cannot be read" in skipped["1/dangling.png"]
    assert listing.class_names == ["0", "1"]  # the linked-in class is not collected
    rels = [e.rel for e in listing.entries]
    assert "1/inside.png" in rels and "0/escape.png" not in rels and not any(r.startswith("8/") for r in rels)
    assert any("lead outside the source root" in r.message and "0/escape.png" in r.message for r in caplog.records)

    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert len(snap.images) == 61  # 60 photos + the inside link; nothing from outside the root
    assert {u["path"] for u in snap.manifest["undecodable"]} == {"0/escape.png", "8/", "1/dangling.png"}
    config = ValidationConfig(class_names=["0", "1"], image_shape=(8, 8, 1), min_rows=10)
    result = validate_snapshot(snap.profile(), snap.manifest, config, tmp_path / "report")
    assert result["success"] is False
    [f] = [f for f in result["failures"] if f["check"] == "no_undecodable"]
    assert "0/escape.png (symbolic link to" in f["summary"] and "8/ (symbolic link to" in f["summary"]

    # a configured class whose folder is a link out of the root: the error says so
    with pytest.raises(DataError, match=r"no folder for configured class.*\['8'\].*not followed: \['8/'\]"):
        sources.list_imagefolder(root, ["0", "1", "8"])

    # the same through an object-storage path on file://
    from airflow.sdk import ObjectStoragePath

    listing = sources.list_imagefolder(ObjectStoragePath(f"file://{root}"))
    assert {"0/escape.png", "8/"} <= {s["path"] for s in listing.skipped}


def test_one_bright_photo_in_an_imagefolder_is_listed_not_fatal(make_imagefolder, tmp_path):
    """Item 8 end to end: decoded from files, one near-white photo (mean brightness above 250, like
    the sky crop of issue 19) passes validation with the default suite and is named in the report."""
    from PIL import Image

    from nightshift.quality import ValidationConfig, validate_snapshot

    root = make_imagefolder(classes=("0", "1", "2"), per_class=30)
    yy, xx = np.mgrid[0:16, 0:16]
    sky = (255 - (yy + 2 * xx) % 7).astype(np.uint8)  # bright, faintly textured
    Image.fromarray(np.stack([sky, sky, sky], axis=2)).save(root / "2" / "sky.png")
    snap = _collect(root, (16, 16, 1), tmp_path / "snaps")
    config = ValidationConfig(class_names=["0", "1", "2"], image_shape=(16, 16, 1))
    result = validate_snapshot(snap.profile(), snap.manifest, config, tmp_path / "report")

    assert result["success"] is True, result["failures"]
    bright = next(a for a in result["appearance"] if a["check"] == "brightness_range")
    assert bright["outliers"] == 1 and bright["rows"] == 91 and bright["passed"] is True
    [image] = bright["images"]
    assert image["source"] == "2/sky.png" and image["value"] > 250
    assert any("2/sky.png" in w for w in result["warnings"])

    strict = ValidationConfig(class_names=["0", "1", "2"], image_shape=(16, 16, 1), max_outlier_share=0)
    assert validate_snapshot(snap.profile(), snap.manifest, strict, tmp_path / "strict")["success"] is False


def test_partition_links_out_of_the_root_are_not_followed(make_imagefolder, tmp_path):
    """Item 11 with date partitions: a partition folder linked in from outside is not read; it keeps
    its place in the window and is recorded there; older than the window, it is none of the run's business."""
    root = tmp_path / "parts"
    root.mkdir()
    make_imagefolder(classes=("0", "1"), per_class=6, name="parts/2026-11-02")
    outside = make_imagefolder(classes=("0", "1"), per_class=6, name="elsewhere")
    (root / "2026-11-01").symlink_to(outside, target_is_directory=True)  # older than a window of 1
    (root / "2026-11-03").symlink_to(outside, target_is_directory=True)  # the newest partition

    # the newest partition is the link: no quiet fall-back to an older one
    with pytest.raises(DataError, match=r"no class folders.*not followed: \['2026-11-03/'\]"):
        sources.list_imagefolder(root, partition_window=1)
    listing = sources.list_imagefolder(root, partition_window=2)
    assert listing.partitions == ["2026-11-02"]  # never the linked-in folder
    assert [s["path"] for s in listing.skipped] == ["2026-11-03/"]
    assert "outside the source root" in listing.skipped[0]["error"]
    listing = sources.list_imagefolder(root, partition_window=3)
    assert listing.partitions == ["2026-11-02"]
    assert [s["path"] for s in listing.skipped] == ["2026-11-01/", "2026-11-03/"]
