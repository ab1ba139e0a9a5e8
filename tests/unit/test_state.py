"""nightshift.state: the shared state (promotion history, deployment state, drift timeline,
retrain-start record) goes through the artifact store. Locally the files are what they always
were; on S3 two workers with separate working copies (cache folders) see each other's writes."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import pytest

from nightshift import contracts, state
from nightshift.store import StoreError, as_store, open_store


@pytest.fixture
def pair(s3_server, s3_root, tmp_path):
    """Two workers' stores on one s3 root (different working copies)."""
    return (open_store(s3_root, cache_dir=tmp_path / "worker-a", s3=s3_server.options()),
            open_store(s3_root, cache_dir=tmp_path / "worker-b", s3=s3_server.options()))


def _event(**over):
    kw = {"model": "m", "action": "promoted", "version": "2", "previous_champion": "1", "champion": "2",
          "reason": "gates passed", "dag_id": "nightly_retrain", "run_id": "r1"}
    return contracts.HistoryEvent(**{**kw, **over})


def test_local_history_is_the_same_jsonl_file(tmp_path):
    keyed, unkeyed = _event(), _event(run_id=None, dag_id=None, action="forced")
    assert state.append_history(tmp_path, keyed) is True
    assert state.append_history(tmp_path, keyed) is False  # a retry of the same run: once
    assert state.append_history(tmp_path, unkeyed) is True
    lines = contracts.history_path(tmp_path, "m").read_text().splitlines()
    assert lines == [json.dumps(asdict(keyed), sort_keys=True), json.dumps(asdict(unkeyed), sort_keys=True)]
    assert state.read_history(tmp_path, "m") == [asdict(keyed), asdict(unkeyed)]
    assert list(state.read_jsonl(contracts.history_path(tmp_path, "m"))) == [asdict(keyed), asdict(unkeyed)]


def test_history_is_shared_and_idempotent_across_workers(pair):
    a, b = pair
    first = _event(time="2026-01-01T00:00:00+00:00")
    assert state.append_history(a, first) is True
    assert state.append_history(b, first) is False  # the same key, written by another worker: kept once
    assert state.append_history(b, _event(action="rolled_back", run_id="r2",
                                              time="2026-01-02T00:00:00+00:00")) is True
    for store in (a, b):
        assert [(e["action"], e["key"]) for e in state.read_history(store, "m")] == [
            ("promoted", "nightly_retrain/r1/m/v2/promoted"), ("rolled_back", "nightly_retrain/r2/m/v2/rolled_back")]
    assert not contracts.history_path(b.local_root, "m").exists()  # nothing read from a working copy


def test_deployment_state_is_shared_across_workers(pair):
    a, b = pair
    assert state.read_deployment(b, "m") is None
    deployed = {"registry_version": "3", "image": "ns/m:3", "container": "c3", "port": 4242}
    uri = state.write_deployment(a, "m", deployed)
    assert uri == f"{a.uri}/deployments/m/state.json"
    assert state.read_deployment(b, "m") == deployed
    assert b.read_records("deployments/m/history.jsonl") == [deployed]
    state.clear_deployment(b, "m")
    assert state.read_deployment(a, "m") is None


def test_local_deployment_state_file_and_clear(tmp_path):
    state.write_deployment(tmp_path, "m", {"registry_version": "1"})
    assert json.loads(contracts.deployment_path(tmp_path, "m").read_text()) == {"registry_version": "1"}
    assert (tmp_path / "deployments" / "m" / "history.jsonl").read_text().count("\n") == 1
    state.clear_deployment(tmp_path, "m")
    assert not contracts.deployment_path(tmp_path, "m").exists()
    contracts.deployment_path(tmp_path, "m").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        state.read_deployment(tmp_path, "m")


def test_drift_timeline_is_shared_across_workers(pair):
    a, b = pair
    state.append_drift_point(a, "m", {"time": "2026-01-01T02:00:00+00:00", "status": "ok"})
    state.append_drift_point(b, "m", {"time": "2026-01-01T01:00:00+00:00", "status": "not_enough_data"})
    for store in (a, b):  # in time order, whoever wrote each point
        assert [p["status"] for p in state.read_drift_timeline(store, "m")] == ["not_enough_data", "ok"]


def test_retrain_start_record_is_shared_and_a_broken_one_fails(pair, s3_server):
    a, b = pair
    assert state.last_retrain_start(b, "nightly_retrain") is None
    when = datetime(2026, 1, 1, 2, tzinfo=timezone.utc)
    state.record_retrain_start(a, "nightly_retrain", when, "asset_triggered__1")
    assert state.last_retrain_start(b, "nightly_retrain") == when
    state.record_retrain_start(b, "nightly_retrain", when + timedelta(hours=1), "asset_triggered__2")
    assert state.last_retrain_start(a, "nightly_retrain") == when + timedelta(hours=1)
    s3_server.client().put_object(Bucket=a.bucket, Key=a.key(contracts.retrain_started_rel("nightly_retrain")),
                                  Body=b"{not json")
    with pytest.raises(ValueError, match=r"s3://.*/state/nightly_retrain/last_retrain.json is unreadable"):
        state.last_retrain_start(b, "nightly_retrain")


def test_as_store_wants_the_store_of_an_s3_root(tmp_path, pair):
    a, _ = pair
    assert as_store(a) is a
    assert as_store(tmp_path).local_root == tmp_path
    with pytest.raises(StoreError, match="must be passed as its Store"):
        as_store(a.uri)


def test_a_retried_drift_check_records_one_point(tmp_path):
    key = "drift_monitor/scheduled__1/check_served_drift/2026-01-01T00:00/2026-01-01T01:00"
    assert state.append_drift_point(tmp_path, "m", {"time": "t1", "status": "ok"}, key=key)
    assert not state.append_drift_point(tmp_path, "m", {"time": "t2", "status": "drift"}, key=key)
    assert state.append_drift_point(tmp_path, "m", {"time": "t3", "status": "ok"}, key=key + "x")
    assert [p["time"] for p in state.read_drift_timeline(tmp_path, "m")] == ["t1", "t3"]
