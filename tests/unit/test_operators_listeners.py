"""nightshift.operators.listeners: the run-note listener reads the run's files through the store the
tasks wrote them to, an ``s3://`` root through the connection ``NIGHTSHIFT_ARTIFACT_CONN_ID``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from nightshift.operators import listeners


@pytest.fixture
def s3_root_with_connection(monkeypatch, tmp_path):
    """An s3:// artifact root whose credentials are only in the Airflow connection; the process
    environment has other (wrong) keys, as a scheduler set up for a different account would."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "s3://bucket/artifacts")
    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CACHE", raising=False)
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "ns_artifacts")
    monkeypatch.setenv("AIRFLOW_CONN_NS_ARTIFACTS", json.dumps({
        "conn_type": "aws", "login": "CONNECTION-KEY", "password": "connection-secret",
        "extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVIRONMENT-KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")


def test_the_run_note_reads_the_store_through_the_artifact_connection(s3_root_with_connection, monkeypatch):
    seen = []

    def fake_run_note(store, dag_id, run_id):
        seen.append((store.uri, store.options.access_key, store.options.secret_key, store.options.endpoint_url,
                     dag_id, run_id))
        return None

    monkeypatch.setattr(listeners, "run_note", fake_run_note)
    listeners._annotate(SimpleNamespace(dag_id="nightly_retrain", run_id="manual__1"))
    assert seen == [("s3://bucket/artifacts", "CONNECTION-KEY", "connection-secret", "http://127.0.0.1:9",
                     "nightly_retrain", "manual__1")]


def test_a_missing_connection_is_logged_naming_it_and_never_raises(s3_root_with_connection, monkeypatch, caplog):
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "ns_nowhere")
    monkeypatch.setattr(listeners, "run_note", lambda *a: pytest.fail("read the store without its connection"))
    listeners._annotate(SimpleNamespace(dag_id="nightly_retrain", run_id="manual__1"))
    assert "ns_nowhere" in caplog.text and "could not write the Nightshift note" in caplog.text
