"""The plumbing every operator shares (nightshift.operators.base): its Docker client and its
artifact store.

Docker: every Docker call goes to the daemon of the task's ``docker_conn_id`` (else
``NIGHTSHIFT_DOCKER_CONN_ID``, else ``DOCKER_HOST``), through one helper:
``NightshiftOperator.docker_client()`` -> ``resolve_docker_client(conn_id)``. No real daemon: the
helper is tested against a stand-in ``DockerHook`` (and the real hook against a closed loopback
port), the operators against a stand-in helper.

Object store: operators on an ``s3://`` artifact root, each task on a "worker" of its own (an
empty working copy: another ``NIGHTSHIFT_ARTIFACT_CACHE``): what one task wrote, the next finds
through the store; XCom carries URIs; a corrupt object is refused; training killed on one worker
resumes on another from the published ``last.pt``; a task fetches only the part of the run folder
it reads (``run_folder_reads``).

Store faults, on a SeaweedFS of the test's own: the store going away in the middle of a task's
publish (the task fails retryably, no half-written collection is ever found, the retry
completes), and a store that refuses the credentials (a clear error naming the URI, the task
fails without retries, nothing is promoted)."""

from __future__ import annotations

import json
import re
import socket
from types import SimpleNamespace

import pytest

from nightshift.errors import ConfigError
from nightshift.operators import (
    CollectDataOperator,
    ExportONNXOperator,
    TrainGPUOperator,
    ValidateDataOperator,
)
from nightshift.store import S3Store, StoreError

# ----------------------------------------------------------------------------- the Docker client

CONN = "docker_gpu_host"


class _Captured(Exception):
    """Raised by a stand-in core function once it has seen the client (the test ends there)."""


def _conn(monkeypatch, conn_id: str, **fields) -> None:
    """Define an Airflow connection through the environment (``AIRFLOW_CONN_<ID>``, JSON)."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "docker", **fields}))


@pytest.fixture
def hooks(monkeypatch):
    """The docker provider's ``DockerHook`` replaced by a recorder whose ``api_client`` is a stand-in."""
    import airflow.providers.docker.hooks.docker as provider

    made = []

    class FakeHook:
        def __init__(self, docker_conn_id=None, base_url=None, version=None, tls=None, timeout=60):
            made.append({"docker_conn_id": docker_conn_id, "base_url": base_url, "tls": tls, "timeout": timeout})
            self.api_client = SimpleNamespace(base_url=base_url)

        construct_tls_config = staticmethod(provider.DockerHook.construct_tls_config)

    monkeypatch.setattr(provider, "DockerHook", FakeHook)
    return made


# --------------------------------------------------------------------------- the helper


def test_a_connection_names_the_daemon_and_the_client_speaks_through_the_hook(monkeypatch, hooks):
    import docker

    from nightshift.operators.base import resolve_docker_client

    _conn(monkeypatch, CONN, extra={"docker_url": "tcp://127.0.0.1:2375"})
    client = resolve_docker_client(CONN)
    assert isinstance(client, docker.DockerClient) and client.api.base_url == "tcp://127.0.0.1:2375"
    # no login in the connection: the hook is not asked to log in to a registry
    assert hooks == [{"docker_conn_id": None, "base_url": "tcp://127.0.0.1:2375", "tls": None, "timeout": 600}]


def test_a_connection_with_a_login_logs_in_and_defaults_to_docker_host(monkeypatch, hooks):
    from nightshift.operators.base import resolve_docker_client

    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    _conn(monkeypatch, CONN, host="registry.internal", port=5000, login="ci", password="s3cret")
    resolve_docker_client(CONN)
    assert hooks[0]["docker_conn_id"] == CONN and hooks[0]["base_url"] == "unix:///run/user/1000/docker.sock"


def test_no_connection_is_the_environment_daemon_as_before(monkeypatch, hooks):
    from nightshift import containers
    from nightshift.operators.base import resolve_docker_client

    env_client = object()
    monkeypatch.setattr(containers, "connect_docker", lambda *a, **k: env_client)
    assert resolve_docker_client(None) is env_client and resolve_docker_client("  ") is env_client
    assert hooks == []


def test_a_missing_connection_is_a_config_error_naming_it(monkeypatch):
    from nightshift.operators.base import resolve_docker_client

    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_DOCKER", raising=False)
    with pytest.raises(ConfigError, match="'no_such_docker' is not defined") as err:
        resolve_docker_client("no_such_docker")
    assert not err.value.retryable


def test_incomplete_tls_extras_are_a_config_error_naming_the_connection(monkeypatch, hooks):
    from nightshift.operators.base import resolve_docker_client

    _conn(monkeypatch, CONN, extra={"docker_url": "tcp://10.0.0.5:2376", "tls_ca_cert": "/etc/docker/ca.pem"})
    with pytest.raises(ConfigError, match=f"'{CONN}': TLS needs"):
        resolve_docker_client(CONN)


def test_an_unreachable_daemon_names_the_connection_and_the_url(monkeypatch):
    """The real hook against a loopback port nobody listens on: a retryable error saying which
    connection and which address."""
    from nightshift.errors import DockerUnavailable
    from nightshift.operators.base import resolve_docker_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    _conn(monkeypatch, CONN, extra={"docker_url": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(DockerUnavailable, match=f"'{CONN}'.*tcp://127.0.0.1:{port}") as err:
        resolve_docker_client(CONN, timeout_s=5)
    assert err.value.retryable


def test_placement_reads_queue_and_connection_from_the_environment():
    from nightshift.placement import DockerPlacement

    assert DockerPlacement.from_env({}) == DockerPlacement(None, None)
    assert DockerPlacement.from_env({}).operator_kwargs() == {}  # Airflow's default queue: nothing changes
    p = DockerPlacement.from_env({"NIGHTSHIFT_DOCKER_QUEUE": " docker ", "NIGHTSHIFT_DOCKER_CONN_ID": "docker_host"})
    assert p == DockerPlacement("docker", "docker_host") and p.operator_kwargs() == {"queue": "docker"}
    for name in ("NIGHTSHIFT_DOCKER_QUEUE", "NIGHTSHIFT_DOCKER_CONN_ID"):
        with pytest.raises(ConfigError, match=name):
            DockerPlacement.from_env({name: "a b"})


# --------------------------------------------------------------------------- every operator uses it


@pytest.fixture
def daemons(monkeypatch, nightshift_home):
    """``resolve_docker_client`` replaced by stand-in daemons, one per connection id; the
    environment's daemon (``connect_docker``) must not be asked."""
    from nightshift import containers
    from nightshift.operators import base

    asked: list = []

    def resolve(conn_id, **_kw):
        asked.append(conn_id)
        return SimpleNamespace(daemon=conn_id)

    def environment(*_a, **_k):
        raise AssertionError("the environment's Docker daemon was used, not the connection's")

    monkeypatch.setattr(base, "resolve_docker_client", resolve, raising=False)
    monkeypatch.setattr(containers, "connect_docker", environment)
    monkeypatch.delenv("NIGHTSHIFT_DOCKER_CONN_ID", raising=False)
    return asked


def _capture(monkeypatch, module, name: str, pick):
    """Replace ``module.name`` by a function that records ``pick(args, kwargs)`` and stops."""
    seen = []

    def stand_in(*args, **kwargs):
        seen.append(pick(args, kwargs))
        raise _Captured

    monkeypatch.setattr(module, name, stand_in)
    return seen


def build(monkeypatch, **kw):
    from nightshift import inference_image
    from nightshift.operators import BuildInferenceImageOperator

    seen = []

    class Builder:
        def __init__(self, client):
            seen.append(client)

        def build(self, **_kw):
            raise _Captured

    monkeypatch.setattr(inference_image, "ImageBuilder", Builder)
    return BuildInferenceImageOperator(task_id="build_inference_image", export={"onnx_path": "m.onnx"},
                                       model_name="m", **kw), seen


def system_eval(monkeypatch, **kw):
    from nightshift import system_eval
    from nightshift.data import snapshot
    from nightshift.operators import SystemEvalOperator

    monkeypatch.setattr(snapshot, "load_snapshot", lambda uri: SimpleNamespace(uri=uri))
    seen = _capture(monkeypatch, system_eval, "run_system_eval", lambda a, k: k["docker_client"])
    return SystemEvalOperator(task_id="system_eval", image={"image": "nightshift/m:1"},
                              snapshot={"snapshot_uri": "s"}, model_name="m", **kw), seen


def deploy(monkeypatch, **kw):
    from nightshift import champion
    from nightshift.operators import DeployModelOperator

    seen = _capture(monkeypatch, champion, "reconcile", lambda a, k: a[1].client)
    return DeployModelOperator(task_id="deploy", promotion={"promoted": True, "champion": "2"}, model_name="m",
                               port=8600, **kw), seen


def rollback(monkeypatch, **kw):
    from nightshift import champion
    from nightshift.operators import SetChampionOperator

    seen = _capture(monkeypatch, champion, "change_champion", lambda a, k: k["deployer"].client)
    return SetChampionOperator(task_id="set_champion", model_name="m", version="previous", reason="v2 misroutes",
                               action="rolled_back", deploy_target="docker", port=8600, **kw), seen


def finalize(monkeypatch, **kw):
    from nightshift import approvals
    from nightshift.operators import FinalizePromotionOperator

    seen = _capture(monkeypatch, approvals, "finalize_approval", lambda a, k: k["docker_client"])
    return FinalizePromotionOperator(
        task_id="finalize_promotion", model_name="m", deploy_target="docker",
        promotion={"awaiting_approval": True, "version": "2", "previous_champion": "1", "model_name": "m"},
        approval={"chosen_options": ["Approve"], "responded_by_user": {"id": "b", "name": "bob"},
                  "params_input": {"comment": "ok"}}, **kw), seen


OPERATORS = [build, system_eval, deploy, rollback, finalize]


def _run(op, seen):
    with pytest.raises(_Captured):
        op.execute({"run_id": "manual__docker_conn"})
    [client] = seen
    return client


@pytest.mark.parametrize("make", OPERATORS, ids=lambda f: f.__name__)
def test_the_operator_uses_the_daemon_of_its_docker_conn_id(make, daemons, monkeypatch):
    op, seen = make(monkeypatch, docker_conn_id=CONN)
    assert "docker_conn_id" in op.template_fields
    assert _run(op, seen).daemon == CONN and daemons == [CONN]


@pytest.mark.parametrize("make", OPERATORS, ids=lambda f: f.__name__)
def test_without_an_argument_the_workers_nightshift_docker_conn_id_is_used(make, daemons, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_DOCKER_CONN_ID", "docker_from_env")
    op, seen = make(monkeypatch)
    assert _run(op, seen).daemon == "docker_from_env" and daemons == ["docker_from_env"]


def test_the_argument_wins_over_the_environment(daemons, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_DOCKER_CONN_ID", "docker_from_env")
    op, seen = deploy(monkeypatch, docker_conn_id=CONN)
    assert _run(op, seen).daemon == CONN


# ----------------------------------------------------------------------------- operators on an object-store artifact root


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
    assert any(k.endswith(f"/{ctx['run_id']}/validation/validation.json") for k in listed), listed

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


# ----------------------------------------------------------------------------- faults of the object store


@pytest.fixture
def own_server(tmp_path):
    from tests import s3server

    server = s3server.start(tmp_path / "seaweedfs")
    yield server
    server.stop()


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
    # promote reads the candidate's ONNX file from the store (and nothing else of the run folder)
    inputs = {"snapshot": {"snapshot_uri": f"{root}/snapshots/collections/x"},
              "training": {"run_id": "r", "metrics": {"test_accuracy": 1.0}},
              "export": {"onnx_path": f"{root}/runs/nightly_retrain/manual__x/model/model.onnx", "onnx_sha256": "0"},
              "image": {"image": "nightshift/faults:1"}, "system_eval": {"accuracy": 1.0}}
    with pytest.raises(AirflowFailException, match=rf"access denied .*{root}/runs/"):
        PromoteModelOperator(task_id="promote", model_name="faults", thresholds={}, gates_file="", **inputs,
                             validation={}, drift={}).execute(ctx)
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert registry.get_champion(c, "faults") is None


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
    assert NightshiftOperator.run_folder_reads is None  # the default: the whole folder
    assert {cls.__name__: cls.run_folder_reads for cls in (
        ops.CollectDataOperator, ops.ValidateDataOperator, ops.TrainGPUOperator, ops.ExportONNXOperator,
        ops.BuildInferenceImageOperator, ops.SystemEvalOperator, ops.DriftCheckOperator, ops.DeployModelOperator,
        ops.PromoteModelOperator, ops.FinalizePromotionOperator, ops.SetChampionOperator,
        ops.DriftMonitorOperator, ops.SweepTrialsOperator, ops.SelectTrialOperator)} == {
        "CollectDataOperator": (), "ValidateDataOperator": ("validation",), "TrainGPUOperator": ("train",),
        "ExportONNXOperator": ("model",), "BuildInferenceImageOperator": (), "SystemEvalOperator": ("system_eval",),
        "DriftCheckOperator": ("drift",), "DeployModelOperator": ("deploy",), "PromoteModelOperator": (),
        "FinalizePromotionOperator": (), "SetChampionOperator": (), "DriftMonitorOperator": (),
        "SweepTrialsOperator": (), "SelectTrialOperator": ()}
    # a sweep trial: its own trial's folder (an earlier try's last.pt), not every trial's under train/
    assert ops.SweepTrialOperator(task_id="t", snapshot={}, trial=3).run_folder_reads == ("train/trials/003",)


#: Operators allowed to pull their whole run folder (``run_folder_reads = None``), each with the reason.
#: None today: every operator names what it reads, so a task on an object-store root never downloads
#: its siblings' files (a training folder's resume checkpoint, every sweep trial's).
WHOLE_RUN_FOLDER_ALLOWED: dict[str, str] = {}


def test_no_operator_pulls_the_whole_run_folder():
    """Every NightshiftOperator in nightshift.operators (the lazily imported ones too) declares what
    of the run folder it reads; a new operator that inherits ``None`` (the whole folder, one HEAD per
    object, every sibling's files) fails here until it does, or is allowed above with a reason."""
    import importlib
    import inspect
    import pkgutil

    import nightshift.operators as package
    from nightshift.operators.base import NightshiftOperator

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, NightshiftOperator) and cls is not NightshiftOperator and cls.__module__ == module.__name__:
                found[name] = cls
    assert {"PromoteModelOperator", "FinalizePromotionOperator", "SweepTrialOperator", "SelectTrialOperator",
            "DriftMonitorOperator", "SetChampionOperator", "TrainGPUOperator"} <= set(found), sorted(found)
    whole = sorted(n for n, cls in found.items() if cls.run_folder_reads is None)
    assert [n for n in whole if n not in WHOLE_RUN_FOLDER_ALLOWED] == [], (
        "these operators pull the whole run folder: declare run_folder_reads (what of the folder they read)")
