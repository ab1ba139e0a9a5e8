"""Content-addressed shards (nightshift.data.shards): a missing, corrupt or replaced shard and an old
format are refused with a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest

from nightshift.data import sources
from nightshift.data.snapshot import load_snapshot, write_snapshot
from nightshift.errors import DataError


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
