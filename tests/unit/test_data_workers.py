"""Decode worker processes (nightshift.data.workers): spawned without re-running the parent's main
(under a task that is the airflow entry point) and without importing Airflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nightshift.data.collect import collect_imagefolder


def _main_module(tmp_path: Path, how: str):
    """A ``__main__`` that breaks any worker process that re-imports it, as the ``airflow``
    entry point does inside a task (the supervisor has blocked the metadata DB there)."""
    import importlib.util
    import shutil
    import types

    main = types.ModuleType("__main__")
    if how == "airflow entry point":  # the real thing: `airflow` re-run in a task process's child
        main.__file__, main.__spec__ = shutil.which("airflow"), None
        assert main.__file__, "the airflow entry point is not on PATH"
    elif how == "script":
        script = tmp_path / "exploding_main.py"
        script.write_text("raise RuntimeError('a decode worker re-ran the parent main script')\n")
        main.__file__, main.__spec__ = str(script), None
    else:  # a main started with `python -m <module>`: re-imported by name
        (tmp_path / "ns_exploding_main.py").write_text("raise RuntimeError('a decode worker re-imported main')\n")
        main.__spec__ = importlib.util.spec_from_file_location("ns_exploding_main", tmp_path / "ns_exploding_main.py")
        main.__file__ = main.__spec__.origin
    return main


@pytest.mark.parametrize("how", ["airflow entry point", "script", "module"])
def test_decode_workers_never_rerun_the_parents_main(make_imagefolder, tmp_path, monkeypatch, how):
    """Under a real scheduler the task's main is the `airflow` entry point: spawned decode workers
    that re-ran it died (BrokenProcessPool, 'Could not parse SQLAlchemy URL')."""
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")  # as in a task
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = make_imagefolder(per_class=100)
    main = _main_module(tmp_path, how)
    monkeypatch.setitem(sys.modules, "__main__", main)
    snap, stats = collect_imagefolder(folder, (8, 8, 1), tmp_path / "snaps", shard_mb=64 * 64 / 2**20, workers=2)
    assert stats.decoded == 300 and snap.count("train") > 0
    assert sys.modules["__main__"] is main  # the parent's main is back


def _airflow_and_main() -> tuple[list[str], str | None, str]:
    main = sys.modules["__main__"]
    return ([m for m in sys.modules if m == "airflow" or m.startswith("airflow.")],
            getattr(main, "__file__", None), getattr(main.__spec__, "name", None) or "")


def test_decode_workers_import_no_airflow(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    import airflow  # noqa: F401 - the parent has it, as a task process does

    from nightshift.data.workers import worker_context

    monkeypatch.setitem(sys.modules, "__main__", _main_module(tmp_path, "airflow entry point"))
    with ProcessPoolExecutor(max_workers=1, mp_context=worker_context()) as pool:
        airflow_modules, main_file, main_name = pool.submit(_airflow_and_main).result(timeout=60)
    assert airflow_modules == [] and main_file is None and main_name == ""
