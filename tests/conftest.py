"""Shared fixtures: real (tiny) data and a trained checkpoint, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The same project-local state scripts/env.sh sets up, for a bare `pytest` too
# (after `make setup` has created it). Must happen before Airflow is imported.
_ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(os.environ.setdefault("NIGHTSHIFT_HOME", str(_ROOT / ".nightshift")))
os.environ.setdefault("AIRFLOW_HOME", str(_HOME / "airflow"))
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_HOME / 'airflow' / 'airflow.db'}")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(_ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(_ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session")
def digits_snapshot(tmp_path_factory):
    """The bundled digits (1,797 real images) as a snapshot."""
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import load_bundled

    return write_snapshot(load_bundled(), tmp_path_factory.mktemp("snapshots"))


@pytest.fixture(scope="session")
def trained(digits_snapshot, tmp_path_factory):
    """A small model trained on the digits snapshot (a few seconds on CPU)."""
    from nightshift.training import train

    return train(digits_snapshot, tmp_path_factory.mktemp("train"), {"epochs": 6, "width": 16})


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze() if array.ndim == 3 and array.shape[2] == 1 else array).save(path)
    return path


@pytest.fixture
def make_imagefolder(tmp_path):
    """Factory: an ImageFolder tree of real digit images (RGB 16×16 PNGs, upscaled)
    with ``per_class`` images for each of ``classes``; ``corrupt`` adds broken files."""
    from sklearn.datasets import load_digits

    digits = load_digits()

    def make(classes=("0", "1", "2"), per_class=30, corrupt=0, name="imagefolder") -> Path:
        root = tmp_path / name
        for cls in classes:
            idx = np.flatnonzero(digits.target == int(cls))[:per_class]
            for i in idx:
                g = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)
                g = np.kron(g, np.ones((2, 2), np.uint8))  # 16×16
                write_png(root / cls / f"{i:04d}.png", np.stack([g, g, g], axis=2))
        for k in range(corrupt):
            bad = root / classes[0] / f"corrupt_{k}.png"
            bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png")
        return root

    return make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (SeaweedFS on loopback, :mod:`tests.s3server`) with bucket ``nightshift-test``."""
    from tests import s3server

    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, request):
    """A fresh ``s3://nightshift-test/<test>-<random>`` prefix."""
    import uuid

    return f"s3://{s3_server.bucket}/{request.node.name[:40].replace('[', '_').replace(']', '_')}-{uuid.uuid4().hex[:8]}"


#: The artifact connection of the ``s3_root_with_*connection`` fixtures (an ``aws`` connection).
ARTIFACT_CONNECTION = {"conn_type": "aws", "login": "CONNECTION-KEY", "password": "connection-secret",
                       "extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}


def _s3_root_env(monkeypatch, tmp_path, conn_id: str) -> None:
    """An s3:// artifact root named with the connection ``conn_id``; the process environment has other
    (wrong) keys, as a scheduler set up for another account would."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "s3://bucket/artifacts")
    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CACHE", raising=False)
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", conn_id)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVIRONMENT-KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")


@pytest.fixture
def s3_root_with_connection(monkeypatch, tmp_path):
    """An s3:// artifact root whose credentials are only in the Airflow connection ``ns_artifacts``,
    defined in the environment (``AIRFLOW_CONN_NS_ARTIFACTS``); the process environment has other
    (wrong) keys (the view's and the run-note listener's tests)."""
    import json

    _s3_root_env(monkeypatch, tmp_path, "ns_artifacts")
    monkeypatch.setenv("AIRFLOW_CONN_NS_ARTIFACTS", json.dumps(ARTIFACT_CONNECTION))


@pytest.fixture
def s3_root_with_db_connection(monkeypatch, tmp_path):
    """As ``s3_root_with_connection``, but the connection (its id is the value) is stored only in the
    Airflow metadata DB, as one added under Admin > Connections is: no ``AIRFLOW_CONN_*`` variable, and
    looked up outside a task and outside a server process (``_AIRFLOW_PROCESS_CONTEXT`` unset), as
    ``airflow dags test``'s run-note listener or a script does. Removed again afterwards."""
    import json
    import uuid

    from airflow.models import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    conn_id = f"ns_artifacts_db_{uuid.uuid4().hex[:8]}"
    _s3_root_env(monkeypatch, tmp_path, conn_id)
    monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)
    monkeypatch.delenv("_AIRFLOW_PROCESS_CONTEXT", raising=False)
    fields = dict(ARTIFACT_CONNECTION)
    with create_session() as session:
        session.add(Connection(conn_id=conn_id, conn_type=fields.pop("conn_type"),
                               extra=json.dumps(fields.pop("extra")), **fields))
    yield conn_id
    with create_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id == conn_id))
