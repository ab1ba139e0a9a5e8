"""Feeding a sharded split to training: preloaded and streamed give the same epochs."""

from __future__ import annotations

import pytest
import torch

from nightshift.data.loader import PreloadedSplit, StreamedSplit, make_loader, plan_batches
from nightshift.data.snapshot import write_snapshot
from nightshift.data.sources import load_bundled
from nightshift.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The digits in shards of 256 images (7 full + 1 partial)."""
    return write_snapshot(load_bundled(), tmp_path_factory.mktemp("snaps"), shard_mb=16 * 1024 / 2**20)


def _epoch_ids(loader, images_by_bytes):
    seen = []
    for xb, yb in loader.epoch():
        assert xb.dtype == torch.uint8 and yb.dtype == torch.long and len(xb) == len(yb) >= 2
        seen.extend(images_by_bytes[bytes(x.numpy().tobytes())] for x in xb)
    return seen


def test_streamed_and_preloaded_epochs_cover_the_split_once(sharded):
    x, y = sharded.split("train")
    ids = {}
    for i, im in enumerate(x):
        ids.setdefault(im.tobytes(), i)  # duplicates map to their first copy
    gen = torch.Generator().manual_seed(0)
    pre = make_loader(sharded, "train", torch.device("cpu"), 100, gen, budget_mb=1000)
    stream = make_loader(sharded, "train", torch.device("cpu"), 100, gen, budget_mb=0)
    assert isinstance(pre, PreloadedSplit) and isinstance(stream, StreamedSplit)
    assert pre.steps == stream.steps and pre.images_per_epoch == stream.images_per_epoch
    from collections import Counter

    a, b = _epoch_ids(pre, ids), _epoch_ids(stream, ids)
    everything = Counter(ids[im.tobytes()] for im in x)
    for seen in (a, b):  # every image once; at most one left over (a lone last image waits)
        assert len(seen) == pre.images_per_epoch >= len(x) - 1
        assert not Counter(seen) - everything
    first, second = _epoch_ids(stream, ids), _epoch_ids(stream, ids)
    assert first != second  # shards and images are reshuffled every epoch


def test_plan_batches_clips_large_batches_and_never_makes_a_batch_of_one():
    assert plan_batches(10, 128) == (10, 1, 10)
    assert plan_batches(10, 4) == (4, 3, 10)
    assert plan_batches(9, 4) == (4, 2, 8)
    with pytest.raises(DataError, match="at least 2"):
        plan_batches(1, 4)


def test_bad_budget_is_refused(sharded):
    with pytest.raises(ConfigError, match="preload_budget_mb"):
        make_loader(sharded, "train", torch.device("cpu"), 64, torch.Generator(), budget_mb=-1)


def test_a_missing_shard_fails_the_stream_naming_it(sharded, tmp_path):
    import shutil

    snap = write_snapshot(load_bundled(), tmp_path, shard_mb=16 * 1024 / 2**20)
    loader = make_loader(snap, "train", torch.device("cpu"), 64, torch.Generator(), budget_mb=0)
    victim = snap.shard_digests[3]
    shutil.rmtree(tmp_path / "shards" / victim)
    from nightshift.data import shards

    shards._verified.clear()
    with pytest.raises(DataError, match=f"shard {victim} is missing"):
        for _ in range(3):
            list(loader.epoch())
