"""Snapshots (nightshift.data.snapshot): shared shards and a record per collection, the profile table,
and splits that stay stable as the data grows."""

from __future__ import annotations

import numpy as np
import pytest

from nightshift.data import sources
from nightshift.data.snapshot import assign_splits, load_snapshot, pixel_hashes, write_snapshot
from nightshift.errors import DataError


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


def test_the_reuse_key_names_the_decoder_versions(monkeypatch):
    """Pillow or its JPEG library decode differently after an upgrade: pixels decoded by another
    version must not be reused."""
    import PIL

    from nightshift.data.snapshot import source_key

    src = {"kind": "imagefolder", "root": "/data/x"}
    before = source_key(src, (32, 32, 3))
    assert source_key(src, (32, 32, 3)) == before and source_key(src, (16, 16, 3)) != before
    monkeypatch.setattr(PIL, "__version__", "0.0-other")
    assert source_key(src, (32, 32, 3)) != before
