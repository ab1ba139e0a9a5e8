"""The one inter-process lock (nightshift.locks): exclusive, released on leaving the block, and a
writer that waits too long gets an error naming the holder. A holder that dies releases it
(the kernel drops the flock): test_champion.py kills one."""

from __future__ import annotations

import os

import pytest

from nightshift.errors import NightshiftError
from nightshift.locks import LockTimeout, file_lock, holder_text


def test_a_held_lock_refuses_a_second_writer_naming_the_holder_and_the_hint(tmp_path):
    path = tmp_path / "locks" / "x.lock"  # the folder is created
    waits = []
    with file_lock(path, timeout_s=5, purpose="promoting v3"):
        with pytest.raises(LockTimeout) as err:
            # timeout 0: one try, then the error; never a wait whose length decides the outcome
            with file_lock(path, timeout_s=0, what="the test lock", hint="wait for v3",
                           on_wait=lambda: waits.append(1)):
                pytest.fail("a second writer got the lock")
    message = str(err.value)
    assert message.startswith(f"the test lock ({path}) is held by pid {os.getpid()} on ")
    assert "(promoting v3)" in message and message.endswith("wait for v3")
    assert waits == [1]  # told once that it waits
    assert err.value.retryable and isinstance(err.value, NightshiftError)


def test_the_lock_is_free_again_after_the_block_even_after_an_error(tmp_path):
    path = tmp_path / "x.lock"
    with pytest.raises(RuntimeError):
        with file_lock(path, timeout_s=0):
            raise RuntimeError("the work failed")
    with file_lock(path, timeout_s=0) as held:
        assert held == path


def test_the_callers_error_type_is_raised_on_timeout(tmp_path):
    class ChampionBusy(LockTimeout):
        pass

    with file_lock(tmp_path / "x.lock", timeout_s=0):
        with pytest.raises(ChampionBusy):
            with file_lock(tmp_path / "x.lock", timeout_s=0, error=ChampionBusy):
                pass


def test_an_unreadable_holder_record_is_an_unknown_holder(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text("{torn")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert holder_text(fd) == "an unknown holder"
    finally:
        os.close(fd)
