"""Run and DAG folders: one folder per id (issue 19, item 9), built in one place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nightshift.artifacts import RUN_META, folder_name, read_run_meta, run_dir, run_path, safe_name

PLUGINS = Path(__file__).resolve().parents[2] / "plugins" / "nightshift"


def test_ids_that_sanitise_alike_get_their_own_folders(tmp_path):
    names = {d: folder_name(d) for d in ("private", "_private", "private_", ".private", "private.")}
    assert len(set(names.values())) == len(names), names
    assert names["private"] == "private"  # already safe: kept as it is
    folders = {d: run_dir(tmp_path, d, "r") for d in names}
    assert len(set(folders.values())) == len(folders)
    for d, f in folders.items():
        assert f.parent.name == names[d] and read_run_meta(f) == {"dag_id": d, "run_id": "r"}


def test_two_run_ids_that_sanitise_alike_do_not_share_a_folder(tmp_path):
    a, b = "manual__2026-11-01T02:00:00+00:00", "manual__2026-11-01T02_00_00_00_00"
    assert safe_name(a) == safe_name(b)  # the old naming put both in one folder
    fa, fb = run_dir(tmp_path, "nightly_retrain", a), run_dir(tmp_path, "nightly_retrain", b)
    assert fa != fb
    (fa / "promotion.json").write_text("a")
    (fb / "promotion.json").write_text("b")
    assert (fa / "promotion.json").read_text() == "a"
    assert json.loads((fa / RUN_META).read_text())["run_id"] == a
    assert json.loads((fb / RUN_META).read_text())["run_id"] == b


@pytest.mark.parametrize("value", ["nightly_retrain", "scheduled__2026-01-02", "manual__2026-11-01T02_00_00_00_00",
                                   "drift-retrain.v2", "run"])
def test_safe_ids_keep_their_path(tmp_path, value):
    assert folder_name(value) == value
    assert run_path(tmp_path, value, value) == tmp_path / "runs" / value / value


def test_a_sanitised_name_never_equals_a_kept_one():
    for value in ("a b", "_x", "x_", "", "ü", "a/b", "../etc", "x" * 300, "a~b"):
        name = folder_name(value)
        assert "~" in name and safe_name(name) != name, name  # a kept name is its own safe_name
        assert re.fullmatch(r"[A-Za-z0-9_.~-]{1,117}", name) and not name.startswith("."), name
    assert folder_name("x" * 300) != folder_name("x" * 301)


def test_run_dir_refuses_a_folder_recorded_for_another_run(tmp_path):
    folder = run_dir(tmp_path, "d", "r")
    (folder / RUN_META).write_text(json.dumps({"dag_id": "other", "run_id": "r"}))
    with pytest.raises(ValueError, match=r"belongs to DAG 'other'.*run.json"):
        run_dir(tmp_path, "d", "r")


def test_run_path_creates_nothing(tmp_path):
    p = run_path(tmp_path, "d", "manual__x:y")
    assert not p.exists() and not (tmp_path / "runs").exists()


def test_every_run_folder_is_built_by_run_path():
    """Nothing outside artifacts.py spells ``"runs" / safe_name(...)`` by hand."""
    offenders = []
    for f in [*PLUGINS.rglob("*.py"), *(PLUGINS.parents[1] / "scripts").glob("*.py")]:
        if f.name == "artifacts.py":
            continue
        text = f.read_text()
        if re.search(r"safe_name\(", text) or re.search(r"""["']runs["']\s*\)?\s*/""", text):
            offenders.append(str(f))
    assert not offenders, offenders
