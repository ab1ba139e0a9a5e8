"""The house rules, checked: the core imports no Airflow, no junk is committed, every committed
benchmark result names the script that writes it, and the unit tests are laid out like the code."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "plugins" / "nightshift"
#: Where Airflow may be imported: the operators, the DAG factories and the UI.
AIRFLOW_LAYERS = ("operators", "ui", "dags")
MAX_FILE_BYTES = 1_000_000


def _imports(path: Path) -> set[str]:
    """Top-level package of every import in ``path``, module level and inside functions alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_core_module_imports_airflow():
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in AIRFLOW_LAYERS]
    assert len(core) > 20  # the scan found the package
    offenders = sorted(str(p.relative_to(ROOT)) for p in core if "airflow" in _imports(p))
    assert offenders == [], f"core modules importing Airflow (move the Airflow part to operators/ or ui/): {offenders}"


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_large_files_are_committed():
    big = sorted(f"{p.relative_to(ROOT)} ({p.stat().st_size:,} bytes)" for p in _tracked()
                 if p.is_file() and p.stat().st_size > MAX_FILE_BYTES)
    assert big == [], f"files over {MAX_FILE_BYTES:,} bytes are committed (profiler dumps? data?): {big}"


def test_every_benchmark_result_comes_from_a_script_here():
    scripts = {p.stem: p.read_text() for p in (ROOT / "bench").glob("*.py")}
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert results
    orphans = [r.name for r in results
               if not any(r.stem in text or r.stem == stem or r.stem.startswith(stem + "_")
                          for stem, text in scripts.items())]
    assert orphans == [], f"bench/results files no script in bench/ writes: {orphans}"


# ----------------------------------------------------------------------------- tests laid out like the code
#
# Every module ``plugins/nightshift/<path>.py`` has its unit tests in ``tests/unit/test_<path>.py``,
# the folders joined by "_": ``gates.py`` -> ``test_gates.py``, ``data/shards.py`` ->
# ``test_data_shards.py``, ``operators/promote.py`` -> ``test_operators_promote.py``. A module with
# much to test may add ``test_<path>_<aspect>.py`` beside it (``test_training_resume.py``).

UNIT_TESTS = ROOT / "tests" / "unit"
#: Modules tested elsewhere, and why (the only exceptions; keep each one's reason).
TESTED_ELSEWHERE = {
    # The Nightshift view (Flask app and its data): tests/ui (test_app_auth, test_view_*, test_browser).
    "ui/app.py": "tests/ui",
    "ui/data.py": "tests/ui",
    # Operator extra links need the plugin and serialized DAGs: tests/ui/test_links.py.
    "operators/links.py": "tests/ui/test_links.py",
    # DAG-run listeners (run notes, deadline notes) run inside a scheduler: tests/integration
    # (test_scheduler.py and test_deadline.py read the run notes they write).
    "operators/listeners.py": "tests/integration",
}
#: Unit-test modules that test something other than a module of the package, and what.
NOT_A_MODULE = {
    "test_run_scripts.py": "scripts/ (make run, the run summary)",
}


def _module_keys() -> dict[str, str]:
    """``{"data_shards": "data/shards.py", ...}`` for every module of the package but ``__init__``."""
    return {"_".join(p.relative_to(PACKAGE).with_suffix("").parts): p.relative_to(PACKAGE).as_posix()
            for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"}


def test_every_module_has_a_unit_test_module_of_its_name():
    keys = _module_keys()
    assert len(keys) > 40  # the scan found the package
    missing = sorted(f"{module} (tests/unit/test_{key}.py)" for key, module in keys.items()
                     if module not in TESTED_ELSEWHERE and not (UNIT_TESTS / f"test_{key}.py").is_file())
    assert missing == [], (f"modules without a unit-test module of their name: {missing}; add it, or name where "
                           "the module is tested in TESTED_ELSEWHERE (tests/test_repository.py) with the reason")
    stale = sorted(m for m in TESTED_ELSEWHERE if m not in keys.values())
    assert stale == [], f"TESTED_ELSEWHERE names modules that no longer exist: {stale}"


def test_every_unit_test_module_is_named_after_a_module():
    keys = _module_keys()
    tests = sorted(p.name for p in UNIT_TESTS.glob("test_*.py"))
    assert tests  # the scan found the tests
    strays = [name for name in tests if name not in NOT_A_MODULE
              and not any(name[len("test_"):-len(".py")] == key or name.startswith(f"test_{key}_") for key in keys)]
    assert strays == [], (f"tests/unit modules named after no module of plugins/nightshift: {strays}; name each "
                          "test_<module path, folders joined by _>[_<aspect>].py after the module it tests")
