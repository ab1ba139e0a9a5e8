"""The house rules, checked: the core imports no Airflow, no junk is committed, every committed
benchmark result names the script that writes it."""

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
