"""Faults of an object-store artifact root, on a SeaweedFS of the test's own: the store going away in
the middle of a task's publish (the task fails retryably, no half-written collection is ever found,
the retry completes), and a store that refuses the credentials (a clear error naming the URI,
the task fails without retries, nothing is promoted)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

from nightshift.store import S3Store, StoreError

RUN_ID = "manual__faults"


@pytest.fixture
def own_server(tmp_path):
    from tests import s3server

    server = s3server.start(tmp_path / "seaweedfs")
    yield server
    server.stop()


@pytest.fixture
def ctx():
    return {"run_id": RUN_ID, "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}


def _env(monkeypatch, tmp_path, server, root: str, cache: str, **over: str) -> None:
    for k, v in {**server.env(), **over}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", root)
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CACHE", str(tmp_path / cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CONN_ID", raising=False)


def _keys(server, prefix: str) -> list[str]:
    out = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in out]


def test_store_down_in_the_middle_of_collect_then_the_retry_completes(own_server, tmp_path, monkeypatch, ctx):
    from nightshift.operators import CollectDataOperator, ValidateDataOperator

    root = f"s3://{own_server.bucket}/outage"
    _env(monkeypatch, tmp_path, own_server, root, "worker-a")
    real_upload = S3Store._upload
    uploads = []

    def upload_then_die(self, path, rel):
        real_upload(self, path, rel)
        uploads.append(rel)
        if len(uploads) == 2:  # the store goes away after the second object of the collection
            own_server.halt()

    monkeypatch.setattr(S3Store, "_upload", upload_then_die)
    monkeypatch.setattr(S3Store, "client", property(_fast_failing_client))
    with pytest.raises(StoreError) as err:
        CollectDataOperator(task_id="collect").execute(ctx)
    assert err.value.retryable and f"{root}/" in str(err.value)  # the task's retries wait for the store
    own_server.resume()
    # what the failed try left is never found as a collection: no record, no latest pointer
    assert not [k for k in _keys(own_server, "outage/snapshots/collections/") if k.endswith("manifest.json")]
    assert _keys(own_server, "outage/snapshots/sources/") == []

    monkeypatch.setattr(S3Store, "_upload", real_upload)
    snap = CollectDataOperator(task_id="collect").execute(ctx)  # the retry, on the same worker
    assert snap["snapshot_uri"].startswith(f"{root}/snapshots/collections/")
    _env(monkeypatch, tmp_path, own_server, root, "worker-b")  # another worker reads it whole
    assert ValidateDataOperator(task_id="validate", snapshot=snap).execute(ctx)["success"]


def _fast_failing_client(self):
    """The store's client with one attempt and short timeouts (the store is down: fail in seconds)."""
    import boto3
    from botocore.config import Config

    if getattr(self, "_fast_client", None) is None:
        o = self.options
        self._fast_client = boto3.client(
            "s3", endpoint_url=o.endpoint_url, region_name=o.region_name, aws_access_key_id=o.access_key,
            aws_secret_access_key=o.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10,
                          s3={"addressing_style": "path"}))
    return self._fast_client


def test_access_denied_fails_at_once_naming_the_uri_and_nothing_is_promoted(own_server, tmp_path, monkeypatch, ctx):
    from airflow.sdk.exceptions import AirflowFailException

    from nightshift import registry
    from nightshift.operators import CollectDataOperator, PromoteModelOperator

    root = f"s3://{own_server.bucket}/denied"
    _env(monkeypatch, tmp_path, own_server, root, "worker-a", AWS_SECRET_ACCESS_KEY="not-the-secret")
    with pytest.raises(AirflowFailException, match=rf"access denied .*{root}/"):
        CollectDataOperator(task_id="collect").execute(ctx)
    inputs = {k: {"snapshot_uri": f"{root}/snapshots/collections/x"} for k in ("snapshot",)}
    with pytest.raises(AirflowFailException, match=rf"access denied .*{root}/runs/"):
        PromoteModelOperator(task_id="promote", model_name="faults", thresholds={}, gates_file="", **inputs,
                             validation={}, training={}, export={}, image={}, system_eval={}, drift={}).execute(ctx)
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert registry.get_champion(c, "faults") is None
