"""Operators on an object-store artifact root (``s3://``), each task on a "worker" of its own
(an empty working copy: another ``NIGHTSHIFT_ARTIFACT_CACHE``): what one task wrote, the
next finds through the store; XCom carries URIs; a corrupt object is refused; training
killed on one worker resumes on another from the published ``last.pt``."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
from nightshift.operators import (
    CollectDataOperator,
    ExportONNXOperator,
    TrainGPUOperator,
    ValidateDataOperator,
)

RUN_ID = "manual__store"


@pytest.fixture
def ctx():
    return {"run_id": RUN_ID, "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}


def _key(s3_root: str, uri: str) -> str:
    """The object key of ``uri`` (``s3://bucket/key``)."""
    assert uri.startswith(s3_root), uri
    return uri.split("/", 3)[3]


def _exists(s3_server, uri: str) -> bool:
    try:
        s3_server.client().head_object(Bucket=s3_server.bucket, Key=uri.split("/", 3)[3])
        return True
    except Exception:  # noqa: BLE001
        return False


def test_collect_on_one_worker_then_validate_train_export_on_others(worker, ctx, s3_server, s3_root):
    from nightshift.store import S3Store, open_store

    cache_a = worker("a")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    assert snap["snapshot_uri"].startswith(f"{s3_root}/snapshots/collections/")
    assert ctx["outlet_events"]  # the asset event names the URI too
    assert next(iter(ctx["outlet_events"].values())).extra["uri"] == snap["snapshot_uri"]
    assert _exists(s3_server, snap["snapshot_uri"] + "/manifest.json")

    cache_b = worker("b")
    assert not cache_b.exists()
    val = ValidateDataOperator(task_id="validate", snapshot=snap).execute(ctx)
    assert val["success"] and val["report_path"].startswith(f"{s3_root}/runs/")
    assert _exists(s3_server, val["report_path"])
    train_op = TrainGPUOperator(task_id="train", snapshot=snap, model_name="store-test",
                                hparams={"epochs": 1, "width": 4})
    train = train_op.execute(ctx)
    assert train["checkpoint"].startswith(f"{s3_root}/runs/") and train["train_dir"].startswith(f"{s3_root}/runs/")
    assert _exists(s3_server, train["checkpoint"]) and _exists(s3_server, train["train_dir"] + "/last.pt")
    assert (cache_b / "nightshift-test").is_dir() and isinstance(train_op.store, S3Store)
    assert snap["snapshot_uri"] == ValidateDataOperator(task_id="v", snapshot=snap).snapshot["snapshot_uri"]

    cache_c = worker("c")  # export: the checkpoint and the snapshot come from the store
    export = ExportONNXOperator(task_id="export", training=train, snapshot=snap, model_name="store-test").execute(ctx)
    assert export["onnx_path"].startswith(f"{s3_root}/runs/") and export["model_dir"].startswith(f"{s3_root}/runs/")
    # it fetched only what it reads of the run folder: its own model/ and the training XCom's train/, not
    # validation's report (run_folder_reads), which the whole-folder pull used to bring along
    run_folder = cache_c / "nightshift-test" / _key(s3_root, val["report_path"]).rsplit("/validation/", 1)[0]
    assert (run_folder / "model").is_dir() and (run_folder / "train").is_dir(), sorted(run_folder.iterdir())
    assert not (run_folder / "validation").exists(), sorted(p.name for p in run_folder.iterdir())

    # a fourth worker reads the model the URI names, bytes as written
    from nightshift.store import sha256_file

    d = open_store(s3_root, cache_dir=worker("d"), s3=s3_server.options())
    local = d.fetch(export["onnx_path"])
    assert sha256_file(local) == export["onnx_sha256"]
    assert not (cache_a / "nightshift-test").joinpath(_key(s3_root, export["onnx_path"])).exists()


def test_a_corrupt_shard_in_the_store_is_refused_naming_it(worker, ctx, s3_server, s3_root):
    from nightshift.store import StoreError

    worker("a")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    manifest = json.loads(s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=_key(s3_root, snap["snapshot_uri"]) + "/manifest.json")["Body"].read())
    shard_key = f"{_key(s3_root, s3_root)}/snapshots/shards/{manifest['shards'][0]['digest']}/labels.npy"
    c = s3_server.client()
    head = c.head_object(Bucket=s3_server.bucket, Key=shard_key)
    body = c.get_object(Bucket=s3_server.bucket, Key=shard_key)["Body"].read()
    c.put_object(Bucket=s3_server.bucket, Key=shard_key, Body=body[:-1] + bytes([body[-1] ^ 1]),
                 Metadata=head["Metadata"])  # other bytes, the sha256 of the true ones

    worker("b")
    with pytest.raises(StoreError, match=re.escape(f"s3://{s3_server.bucket}/{shard_key}")):
        ValidateDataOperator(task_id="validate", snapshot=snap).execute(ctx)


def test_a_failed_validation_publishes_its_report_and_collection_is_incremental_across_workers(
        worker, ctx, s3_server, s3_root, make_imagefolder):
    from airflow.sdk.exceptions import AirflowFailException

    root = make_imagefolder(classes=("0", "1", "2"), per_class=20, corrupt=1)
    worker("a")
    snap = CollectDataOperator(task_id="collect", source=str(root), image_shape=[8, 8, 1], workers=1).execute(ctx)
    assert snap["undecodable"] == 1 and snap["incremental"]["decoded"] == 60

    worker("b")
    with pytest.raises(AirflowFailException, match="corrupt_0.png"):
        ValidateDataOperator(task_id="validate", snapshot=snap, min_rows=10).execute(ctx)
    listed = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix=_key(s3_root, s3_root) + "/runs/").get("Contents", [])]
    assert any(k.endswith(f"/{RUN_ID}/validation/validation.json") for k in listed), listed

    # a third worker, never having seen the source: the previous collection comes from the store
    worker("c")
    again = CollectDataOperator(task_id="collect", source=str(root), image_shape=[8, 8, 1], workers=1).execute(ctx)
    assert again["incremental"]["decoded"] == 0 and again["incremental"]["reused"] == 60
    assert again["digest"] == snap["digest"] and again["collection_id"] != snap["collection_id"]


def test_training_killed_on_one_worker_resumes_on_another_from_the_published_last_pt(worker, ctx, s3_server, s3_root):
    worker("a")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    hp = {"epochs": 3, "width": 4}
    first = TrainGPUOperator(task_id="train", snapshot=snap, model_name="store-resume", hparams=hp)
    publish = first._publish_resume_state

    def killed_after_publishing(last):  # the worker dies once epoch 1's last.pt is in the store
        publish(last)
        first._stop = True

    first._publish_resume_state = killed_after_publishing
    with pytest.raises(InterruptedError):
        first.execute(ctx)
    last_uri = first.store.to_uri(first.run_dir(ctx, "train") / "last.pt")
    assert _exists(s3_server, last_uri)

    worker("b")
    second = TrainGPUOperator(task_id="train", snapshot=snap, model_name="store-resume", hparams=hp)
    out = second.execute(ctx)
    manifest = json.loads(s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=_key(s3_root, out["train_dir"]) + "/train_manifest.json")["Body"].read())
    assert manifest["resumed_from_epoch"] == 1
    assert len(out["metrics"]) and out["run_id"]


def test_xcom_inputs_become_local_files_and_outputs_uris(worker, s3_server, s3_root):
    from nightshift.operators.base import localize, to_uris
    from nightshift.store import open_store

    a = open_store(s3_root, cache_dir=worker("a"), s3=s3_server.options())
    f = a.local_root / "runs" / "d" / "r" / "model" / "model.onnx"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"onnx")
    out = to_uris(a, {"onnx_path": str(f), "n": 3, "other": "/etc/hosts"}, keep_local=None)
    assert out == {"onnx_path": f"{s3_root}/runs/d/r/model/model.onnx", "n": 3, "other": "/etc/hosts"}
    assert _exists(s3_server, out["onnx_path"])  # published: it was outside the run folder given

    b = open_store(s3_root, cache_dir=worker("b"), s3=s3_server.options())
    snap_uri = f"{s3_root}/snapshots/collections/abc"
    got = localize(b, {"export": {"onnx_path": out["onnx_path"]}, "snapshot_uri": snap_uri, "x": ["s3://elsewhere/y"]})
    assert got["export"]["onnx_path"] == str(b.local_root / "runs/d/r/model/model.onnx")
    assert (b.local_root / "runs/d/r/model/model.onnx").read_bytes() == b"onnx"
    assert got["snapshot_uri"] == snap_uri and got["x"] == ["s3://elsewhere/y"]


def test_artifact_connection_gives_the_store_options_and_a_missing_one_is_named(monkeypatch):
    from nightshift.errors import ConfigError
    from nightshift.operators.base import artifact_s3_options

    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CONN_ID", raising=False)
    assert artifact_s3_options() is None
    monkeypatch.setenv("AIRFLOW_CONN_NIGHTSHIFT_S3", json.dumps({
        "conn_type": "aws", "login": "AKID", "password": "SECRET",
        "extra": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "nightshift_s3")
    o = artifact_s3_options()
    assert (o.access_key, o.secret_key, o.endpoint_url, o.region_name) == (
        "AKID", "SECRET", "http://127.0.0.1:9000", "eu-west-1")
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_STORE", raising=False)
    with pytest.raises(ConfigError, match="no_such_store"):
        artifact_s3_options("no_such_store")


def test_the_store_is_built_lazily_and_a_local_root_stays_a_folder(nightshift_home, monkeypatch):
    from nightshift.store import LocalStore

    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CONN_ID", "undefined_but_unused")  # a local root never looks it up
    op = ValidateDataOperator(task_id="v", snapshot=None)
    assert "store" not in op.__dict__
    assert isinstance(op.store, LocalStore) and op.store.local_root == nightshift_home / "artifacts"


@pytest.mark.parametrize("uri, local", [
    ("http://mlflow:5000", False), ("https://mlflow.example", False),
    ("sqlite:////x/mlflow.db", True), ("/x/mlruns", True), ("postgresql://u@db/mlflow", True),
])
def test_mlflow_artifacts_go_to_the_server_when_there_is_one(uri, local, tmp_path):
    from nightshift.train_run import default_artifact_location

    got = default_artifact_location(uri, tmp_path)
    assert got == ((tmp_path / "mlartifacts").as_uri() if local else None)


def test_training_pod_on_an_object_store_gets_uris_and_the_secret_not_a_claim(monkeypatch, tmp_path):
    from kubernetes.client import ApiClient
    from nightshift.operators.train_pod import TrainGPUPodOperator

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NIGHTSHIFT_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CONN_ID", raising=False)
    op = TrainGPUPodOperator(task_id="train_gpu", image="img", namespace="default", artifact_pvc="claim",
                             snapshot={"snapshot_uri": "s3://bucket/prefix/snapshots/collections/c1"},
                             artifact_secret="nightshift-s3")
    ti = SimpleNamespace(dag_id="nightly_retrain", task_id="train_gpu", map_index=-1, try_number=1)
    context = {"run_id": "r1", "ti": ti, "dag": SimpleNamespace()}
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    base = pod["spec"]["containers"][0]
    args = base["args"]
    assert args[args.index("--out-dir") + 1] == "s3://bucket/prefix/runs/adhoc_airflow/r1/train"
    assert args[args.index("--snapshot-uri") + 1] == "s3://bucket/prefix/snapshots/collections/c1"
    env = {e["name"]: e.get("value") for e in base["env"]}
    assert env["NIGHTSHIFT_ARTIFACT_ROOT"] == "s3://bucket/prefix"
    assert env["NIGHTSHIFT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "worker-secret" not in json.dumps(pod)
    assert {"secretRef": {"name": "nightshift-s3"}} in base["envFrom"]
    assert not any(v["name"] == "nightshift-artifacts" for v in pod["spec"].get("volumes") or [])


def test_a_task_pulls_only_the_parts_of_the_run_folder_it_reads(tmp_path):
    """RunFolderSync.pull: the whole folder for ``None``, else one fetch per part named; a part that
    leaves the folder is refused. Each operator that reads only its own folder says so."""
    from nightshift import operators as ops
    from nightshift.operators.base import NightshiftOperator, RunFolderSync

    fetched = []

    class Store:
        def to_uri(self, path):
            return "s3://b/" + path.relative_to(tmp_path).as_posix()

        def fetch(self, uri, *, required=True):
            assert required is False
            fetched.append(uri)

    folder = tmp_path / "runs" / "nightly_retrain" / "r1"
    RunFolderSync(Store(), folder).pull()
    RunFolderSync(Store(), folder).pull(("train", "model/model.onnx"))
    RunFolderSync(Store(), folder).pull(())
    assert fetched == ["s3://b/runs/nightly_retrain/r1", "s3://b/runs/nightly_retrain/r1/train",
                       "s3://b/runs/nightly_retrain/r1/model/model.onnx"]
    for bad in ("../r2", "/etc", ""):
        with pytest.raises(ValueError, match="not a path inside the run folder"):
            RunFolderSync(Store(), folder).pull((bad,))
    assert NightshiftOperator.run_folder_reads is None  # the default: the whole folder, as before
    assert {cls.__name__: cls.run_folder_reads for cls in (
        ops.CollectDataOperator, ops.ValidateDataOperator, ops.TrainGPUOperator, ops.ExportONNXOperator,
        ops.BuildInferenceImageOperator, ops.SystemEvalOperator, ops.DriftCheckOperator, ops.DeployModelOperator,
        ops.PromoteModelOperator)} == {
        "CollectDataOperator": (), "ValidateDataOperator": ("validation",), "TrainGPUOperator": ("train",),
        "ExportONNXOperator": ("model",), "BuildInferenceImageOperator": (), "SystemEvalOperator": ("system_eval",),
        "DriftCheckOperator": ("drift",), "DeployModelOperator": ("deploy",), "PromoteModelOperator": None}
