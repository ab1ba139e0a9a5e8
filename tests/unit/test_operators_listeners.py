"""nightshift.operators.listeners: the run-note listener reads the run's files through the store the
tasks wrote them to, an ``s3://`` root through the connection ``NIGHTSHIFT_ARTIFACT_CONN_ID``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nightshift.operators import listeners


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


def test_the_run_note_reads_the_store_through_a_connection_stored_only_in_the_metadata_db(
        s3_root_with_db_connection, monkeypatch):
    """Under ``airflow dags test`` the listener runs outside a task and outside a server process, where
    the task SDK does not read the metadata DB: a connection added in the UI is found there all the same."""
    seen = []
    monkeypatch.setattr(listeners, "run_note", lambda store, dag_id, run_id: seen.append(
        (store.options.access_key, store.options.secret_key, store.options.endpoint_url)))
    listeners._annotate(SimpleNamespace(dag_id="nightly_retrain", run_id="manual__1"))
    assert seen == [("CONNECTION-KEY", "connection-secret", "http://127.0.0.1:9")]


def test_a_missing_connection_is_logged_naming_it_and_never_raises(s3_root_with_connection, monkeypatch, caplog):
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "ns_nowhere")
    monkeypatch.setattr(listeners, "run_note", lambda *a: pytest.fail("read the store without its connection"))
    listeners._annotate(SimpleNamespace(dag_id="nightly_retrain", run_id="manual__1"))
    assert "ns_nowhere" in caplog.text and "could not write the Nightshift note" in caplog.text
