"""What the DAG-parse tests share: parsing DAG files afresh under a given environment."""

from __future__ import annotations

from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"


def parse_dags(monkeypatch, path: Path, clear: tuple[str, ...], **env: str):
    """Parse ``path`` (a DAG file or folder) with the variables ``clear`` unset except those in
    ``env`` (the DAG files read them at parse time); returns ``(dags by id, import errors)``."""
    from airflow.dag_processing.dagbag import DagBag

    for name in clear:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(path))
    return bag.dags, bag.import_errors
