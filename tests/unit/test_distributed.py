"""nightshift.distributed: the torchrun world, rank slices and the launch command."""

from __future__ import annotations

import pytest

from nightshift import distributed as D
from nightshift.errors import ConfigError


def test_world_from_env():
    assert D.from_env({}) == D.World()
    assert not D.from_env({}).distributed
    w = D.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (w.rank, w.local_rank, w.size, w.distributed, w.is_main) == (3, 1, 4, True, False)
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError):
            D.from_env(bad)


@pytest.mark.parametrize("n,size", [(10, 1), (10, 2), (10, 3), (1024, 8), (7, 4)])
def test_rank_slices_cover_a_batch_once(n, size):
    covered = []
    for r in range(size):
        s = D.rank_slice(n, D.World(rank=r, local_rank=r, size=size))
        covered.extend(range(n)[s])
        assert s.stop - s.start in (n // size, n // size + 1)
    assert covered == list(range(n))


def test_batch_too_small_for_the_world():
    D.check_batch(4, D.World(size=2))
    with pytest.raises(ConfigError, match="batch_size >= 6"):
        D.check_batch(5, D.World(size=3))


def test_launch_command():
    cmd = D.launch_command(2, ["--snapshot-uri", "/s"])
    assert cmd[-5:] == ["--nproc_per_node=2", "-m", "nightshift.train_cli", "--snapshot-uri", "/s"][-5:]
    assert "--standalone" in cmd and ("torchrun" in cmd[0] or cmd[1:3] == ["-m", "torch.distributed.run"])
    with pytest.raises(ConfigError):
        D.launch_command(0, [])
