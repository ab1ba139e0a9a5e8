from __future__ import annotations

from types import SimpleNamespace

import pytest

from nightshift.ui import data

from .conftest import MODEL


def _overview(world):
    from nightshift import registry

    return data.build_overview(world["root"], registry.client(world["tracking_uri"]))


def test_overview_lists_versions_aliases_gates_and_reports(world_env):
    o = _overview(world_env)
    assert o["registry_error"] is None
    (m,) = o["models"]
    assert m["name"] == MODEL and m["champion"] == "1" and m["challenger"] == "2" and m["n_versions"] == 2
    v2, v1 = m["versions"]  # newest first
    assert v1["aliases"] == ["champion"] and v2["aliases"] == ["challenger"]
    assert v1["decision"] == "BLESSED" and v2["decision"] == "NOT_BLESSED"
    assert "vs_champion" in v2["reason"] and v2["baseline_version"] == "1"
    gates = {g["name"]: g for g in v2["gates"]}
    assert gates["vs_champion"]["passed"] is False and gates["vs_champion"]["observed"]
    assert all(g["passed"] for g in v1["gates"]) and len(v1["gates"]) == len(v2["gates"]) >= 4
    assert v1["image"] == f"nightshift/{MODEL}:v1" and v1["image_id"].startswith("sha256:")
    assert v1["data_digest"] == "1" * 64 and v1["dag_run"] == world_env["versions"][0]["run_id"]
    assert v1["mlflow_run_url"] == f"http://mlflow.example:5000/#/runs/{world_env['versions'][0]['mlflow_run']}"
    assert v1["mlflow_version_url"] == f"http://mlflow.example:5000/#/models/{MODEL}/versions/1"
    assert [r["name"] for r in v1["reports"]] == ["validation", "parity", "system_eval", "drift", "promotion"]
    for r in v1["reports"]:
        assert r["path"].startswith("runs/nightly_retrain/") and data.resolve_report(world_env["root"], r["path"])


def test_overview_has_deployment_history_and_drift_newest_first(world_env):
    (m,) = _overview(world_env)["models"]
    assert m["deployment"]["version"] == "1" and m["deployment"]["status"] == "serving"
    assert [e["action"] for e in m["history"]] == ["rejected", "promoted"]
    assert m["history"][0]["report_path"].endswith("promotion.json")
    assert [p["status"] for p in m["drift"]] == ["drift", "ok", "not_enough_data"]
    assert m["drift"][0]["report_path"] == f"drift/{MODEL}/2026-11-02T03/drift_report.html"
    assert m["drift"][1]["report_path"] is None


def test_empty_world_says_none_yet(tmp_path):
    from nightshift import registry

    o = data.build_overview(tmp_path / "artifacts", registry.client(f"sqlite:///{tmp_path / 'empty.db'}"))
    assert o["models"] == [] and o["registry_error"] is None


def test_files_without_a_registered_model_still_show(tmp_path):
    from nightshift.contracts import HistoryEvent
    from nightshift.state import append_history

    class Broken:
        def search_registered_models(self):
            raise ConnectionError("registry down")

    append_history(tmp_path, HistoryEvent(model="m", action="forced", version="3", previous_champion="2",
                                          champion="3", reason="manual", actor="alice"))
    o = data.build_overview(tmp_path, Broken())
    assert "registry down" in o["registry_error"]
    (m,) = o["models"]
    assert m["name"] == "m" and m["versions"] == [] and m["history"][0]["actor"] == "alice"
    assert m["deployment"] is None and m["drift"] == []


def test_resolve_report_refuses_anything_outside_the_served_folders(tmp_path):
    root = tmp_path / "artifacts"
    (root / "runs" / "d" / "r").mkdir(parents=True)
    (root / "runs" / "d" / "r" / "ok.json").write_text("{}")
    (root / "snapshots").mkdir()
    (root / "snapshots" / "secret.json").write_text("{}")
    (tmp_path / "outside.txt").write_text("x")
    (root / "runs" / "d" / "r" / "link.txt").symlink_to(tmp_path / "outside.txt")
    assert data.resolve_report(root, "runs/d/r/ok.json") == (root / "runs/d/r/ok.json").resolve()
    for bad in ("snapshots/secret.json", "../outside.txt", "runs/../snapshots/secret.json", "/etc/passwd",
                "runs/d/r/link.txt", "runs", "runs/d", "runs/d/r/missing.json", "", "runs/d/r/ok.json\x00"):
        assert data.resolve_report(root, bad) is None, bad


def test_each_version_says_how_its_approval_ended_not_always_approved_by(tmp_path):
    """``approved_by`` names whoever answered: a Reject, a stale or superseded Approve must not
    read "approved by" in the view."""
    from nightshift.ui.app import _jinja

    def mv(n, **tags):
        return SimpleNamespace(version=str(n), run_id=None, creation_timestamp=None,
                               tags={f"nightshift.{k}": v for k, v in tags.items()})

    versions = [
        mv(1, approval="approved", approved_by="bob"),
        mv(2, approval="rejected", approved_by="carol"),
        mv(3, approval="superseded", approved_by="erin", superseded_by="5"),
        mv(4, approval="superseded", superseded_by="5"),
        mv(5, approval="stale", approved_by="dan"),
        mv(6, approval="undeployable", approved_by="fay"),
        mv(7, awaiting_approval="true"),
        mv(8),
    ]

    class Client:
        def search_registered_models(self):
            return [SimpleNamespace(name="m", aliases={"champion": "1"}, description="")]

        def search_model_versions(self, _filter):
            return versions

    o = data.build_overview(tmp_path, Client())
    texts = {v["version"]: v["approval_text"] for v in o["models"][0]["versions"]}
    assert texts == {
        "1": "approved by bob", "2": "rejected by carol", "3": "superseded by v5 (erin answered too late)",
        "4": "superseded by v5 before anyone answered",
        "5": "approved by dan, stale: champion moved while it waited (not promoted)",
        "6": "approved by fay, but not deployable (not promoted)", "7": "awaiting approval", "8": None}
    assert {v["version"]: v["approval"] for v in o["models"][0]["versions"]}["2"] == "rejected"
    html = _jinja().get_template("view.html").render(o=o, user="u")
    assert "rejected by carol" in html and "superseded by v5 (erin answered too late)" in html
    for wrong in ("approved by carol", "approved by erin"):
        assert wrong not in html, wrong


def test_the_view_reads_history_deployment_drift_and_reports_from_s3(s3_server, s3_root, tmp_path):
    """Workers published to an s3 root; the view (the API server, its own working copy) shows it all."""
    from nightshift import contracts, state
    from nightshift.artifacts import atomic_write_json, atomic_write_text, run_dir
    from nightshift.store import open_store

    worker = open_store(s3_root, cache_dir=tmp_path / "worker", s3=s3_server.options())
    view = open_store(s3_root, cache_dir=tmp_path / "api-server", s3=s3_server.options())
    folder = run_dir(worker.local_root, "nightly_retrain", "scheduled__1")
    report = atomic_write_json(folder / "promotion.json", {"promoted": True, "version": "1"})
    atomic_write_json(folder / "validation" / "validation.json", {"summary": {"appearance": [
        {"check": "brightness", "column": "brightness", "range": [0.1, 0.9], "outliers": 2, "images": []}]}})
    worker.publish(folder)
    drift_html = atomic_write_text(worker.local_root / "drift" / "m" / "run1" / "served_drift.html", "<html>drift</html>")
    worker.publish(drift_html)
    state.append_history(worker, contracts.HistoryEvent(
        model="m", action="promoted", version="1", previous_champion=None, champion="1", reason="gates passed",
        dag_id="nightly_retrain", run_id="scheduled__1", extra={"report": worker.to_uri(report)}))
    state.write_deployment(worker, "m", {"registry_version": "1", "status": "serving"})
    state.append_drift_point(worker, "m", {"time": "2026-01-01T01:00:00+00:00", "status": "ok",
                                               "report": worker.to_uri(drift_html)})
    state.append_drift_point(worker, "unregistered", {"time": "2026-01-01T01:00:00+00:00", "status": "ok"})

    class Client:
        def search_registered_models(self):
            return [SimpleNamespace(name="m", aliases={"champion": "1"}, description="")]

        def search_model_versions(self, _filter):
            return [SimpleNamespace(version="1", run_id=None, creation_timestamp=None,
                                    tags={"nightshift.dag_run": "scheduled__1"})]

    o = data.build_overview(view, Client())
    assert o["artifact_root"] == s3_root and [m["name"] for m in o["models"]] == ["m", "unregistered"]
    m = o["models"][0]
    assert m["deployment"] == {"registry_version": "1", "status": "serving"}
    assert [(e["action"], e["report_path"]) for e in m["history"]] == [
        ("promoted", "runs/nightly_retrain/scheduled__1/promotion.json")]
    assert [(p["status"], p["report_path"]) for p in m["drift"]] == [("ok", "drift/m/run1/served_drift.html")]
    (v,) = m["versions"]
    assert [r["path"] for r in v["reports"]] == ["runs/nightly_retrain/scheduled__1/validation/validation.json",
                                                "runs/nightly_retrain/scheduled__1/promotion.json"]
    assert v["validation"]["outliers"] == 2
    got = data.resolve_report(view, "runs/nightly_retrain/scheduled__1/promotion.json")
    assert got.is_relative_to(view.local_root.resolve()) and got.read_text() == report.read_text()
    assert data.resolve_report(view, "drift/m/run1/served_drift.html").read_text() == "<html>drift</html>"
    assert data.report_dag_id(view, "runs/nightly_retrain/scheduled__1/promotion.json") == "nightly_retrain"
    for bad in ("runs/nightly_retrain/scheduled__1", "runs/../state/x.json", "deployments/m/state.json",
                "runs/nightly_retrain/scheduled__1/missing.json", "/etc/passwd", "runs//x"):
        assert data.resolve_report(view, bad) is None, bad
    assert not contracts.history_path(view.local_root, "m").exists()  # read from the store, not a working copy


def test_a_model_with_no_timed_runs_says_so_instead_of_a_schedule(tmp_path):
    """``schedule: null`` in the models file: the view says the model retrains on drift only, not
    ``schedule None UTC``; a model with a cron keeps it."""
    from nightshift.model_config import parse_models
    from nightshift.ui.app import _jinja

    class Client:
        def search_registered_models(self):
            return []

    configured = parse_models("models:\n  - {name: a, schedule: null}\n"
                              "  - {name: b, schedule: '0 3 * * *', deploy: {port: 8610}}\n")
    o = data.build_overview(tmp_path, Client(), configured=configured)
    assert [m["config"]["schedule"] for m in o["models"]] == [None, "0 3 * * *"]
    html = _jinja().get_template("view.html").render(o=o, user="u")
    assert "no timed runs (drift only)" in html and "0 3 * * *" in html
    assert "schedule <span class=\"mono\">None" not in html


def test_the_view_reads_the_store_through_the_artifact_connection(s3_root_with_connection, monkeypatch):
    """The API server opens an ``s3://`` root with the connection ``NIGHTSHIFT_ARTIFACT_CONN_ID`` (the
    workers' credentials), not its own ``AWS_*`` environment; a connection that is not defined is a
    503 naming it."""
    from fastapi import HTTPException

    from nightshift.ui import app

    store = app._store()
    assert store.uri == "s3://bucket/artifacts"
    assert (store.options.access_key, store.options.endpoint_url) == ("CONNECTION-KEY", "http://127.0.0.1:9")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "ns_nowhere")
    with pytest.raises(HTTPException) as err:
        app._store()
    assert err.value.status_code == 503 and "ns_nowhere" in err.value.detail


def test_the_view_reads_the_store_through_an_artifact_connection_stored_only_in_the_metadata_db(
        s3_root_with_db_connection, monkeypatch):
    """A connection added under Admin > Connections (only in the metadata DB) opens the root too, also
    where the task SDK's lookup does not read the DB (not a server process); an undefined one is
    still the 503 naming it."""
    from airflow.sdk import BaseHook
    from fastapi import HTTPException

    from nightshift.ui import app

    with pytest.raises(Exception, match="isn't defined"):  # what the SDK alone finds here: nothing
        BaseHook.get_connection(s3_root_with_db_connection)
    store = app._store()
    assert store.uri == "s3://bucket/artifacts"
    assert (store.options.access_key, store.options.secret_key, store.options.endpoint_url,
            store.options.region_name) == ("CONNECTION-KEY", "connection-secret", "http://127.0.0.1:9", "eu-west-1")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "ns_nowhere")
    with pytest.raises(HTTPException) as err:
        app._store()
    assert err.value.status_code == 503 and "ns_nowhere" in err.value.detail
    assert "is not defined" in err.value.detail and "AIRFLOW_CONN_NS_NOWHERE" in err.value.detail
