"""TrainGPUPodOperator (nightshift.operators.train_pod): the training pod the kubernetes_pod placement
renders (dry run: no cluster, the spec serialized as the Kubernetes API would receive it), and how
it fails."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nightshift.artifacts import run_dir
from nightshift.placement import TrainPlacement
from tests.unit.placement_support import GPU_TOLERATION, K8S_ENV, api_dict, common_args


@pytest.fixture
def pod_operator(monkeypatch, tmp_path):
    from nightshift.operators import train_task

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')  # no cluster, no kubeconfig
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "/data/artifacts")
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")
    placement = TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "kubernetes_pod",
                                         "NIGHTSHIFT_TRAINER_IMAGE": "registry.local/nightshift:3.3.2-cuda",
                                         "NIGHTSHIFT_ARTIFACT_PVC": "nightshift-artifacts",
                                         "NIGHTSHIFT_K8S_NAMESPACE": "ml-train", **K8S_ENV})
    return train_task(placement, **common_args(env={"HF_HUB_OFFLINE": "1"}))


def test_kubernetes_pod_placement_renders_the_training_pod(pod_operator):
    from nightshift.operators import TrainGPUPodOperator

    op = pod_operator
    assert isinstance(op, TrainGPUPodOperator) and op.task_id == "train_gpu" and op.pool == "nightshift_gpu"
    assert op.do_xcom_push is True
    ti = SimpleNamespace(dag_id="nightly_retrain", task_id="train_gpu", map_index=-1, try_number=1)
    context = {"run_id": "scheduled__2026-01-02", "ti": ti, "dag": SimpleNamespace()}
    pod = api_dict(op.build_pod_request_obj(context, dry_run=True))
    assert pod["metadata"]["namespace"] == "ml-train"
    assert pod["metadata"]["labels"]["task_id"] == "train_gpu"
    spec = pod["spec"]
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert base["image"] == "registry.local/nightshift:3.3.2-cuda"
    assert base["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "16Gi"}
    # two GPUs: one data-parallel process per GPU under torchrun
    assert base["command"] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "nightshift.train_cli"]
    args = base["args"]

    def arg(flag):
        return args[args.index(flag) + 1]

    assert arg("--snapshot-uri") == "/data/artifacts/snapshots/s1"
    assert arg("--out-dir") == str(run_dir(Path("/data/artifacts"), op.dag_id, "scheduled__2026-01-02") / "train")
    assert arg("--out-dir").startswith("/data/artifacts/runs/")
    assert json.loads(arg("--hparams")) == {"epochs": 3, "lr": None, "model": "small_cnn"}
    assert "--require-gpu" in args and arg("--result-path") == "/airflow/xcom/return.json"
    assert arg("--model-name") == "digits" and arg("--run-name") == "scheduled__2026-01-02"
    env = {e["name"]: e.get("value") for e in base["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"
    assert env["NIGHTSHIFT_ARTIFACT_ROOT"] == "/data/artifacts" and env["HF_HUB_OFFLINE"] == "1"
    mounts = {m["name"]: m["mountPath"] for m in base["volumeMounts"]}
    assert mounts["nightshift-artifacts"] == "/data/artifacts"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["nightshift-artifacts"]["persistentVolumeClaim"] == {"claimName": "nightshift-artifacts"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [GPU_TOLERATION]
    # results come back through XCom: the provider's sidecar shares /airflow/xcom with the trainer
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])
    assert mounts["xcom"] == "/airflow/xcom"


def test_a_retry_s_pod_tags_its_run_with_the_try_and_ends_the_killed_try_s_run_naming_it(pod_operator, tmp_path):
    """The pod of try 2 passes ``--tag nightshift.try_number=2`` to train_cli (as the in-worker path
    tags its run), so the run a killed pod of try 1 left RUNNING is ended as superseded by try 2,
    not by "unknown"."""
    from mlflow.tracking import MlflowClient

    from nightshift import train_run
    from nightshift.train_cli import build_parser

    ti = SimpleNamespace(dag_id="nightly_retrain", task_id="train_gpu", map_index=-1, try_number=2)
    context = {"run_id": "scheduled__2026-01-02", "ti": ti, "dag": SimpleNamespace()}
    pod = api_dict(pod_operator.build_pod_request_obj(context, dry_run=True))
    args = next(c for c in pod["spec"]["containers"] if c["name"] == "base")["args"]
    assert f"{train_run.TRY_TAG}=2" in [args[i + 1] for i, a in enumerate(args) if a == "--tag"]
    # no task instance (dry run outside a task): no try tag rather than a made-up one
    assert not any(a.startswith(train_run.TRY_TAG) for a in pod_operator.cli_arguments("dry_run"))

    tags = dict(build_parser().parse_args(args).tag)  # what train_cli hands run_training
    assert tags[train_run.TRY_TAG] == "2" and tags["nightshift.task"] == "train_gpu"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("digits", artifact_location=(tmp_path / "mlartifacts").as_uri())
    killed = client.create_run(exp, tags={**tags, train_run.TRY_TAG: "1"}).info.run_id
    retry = client.create_run(exp, tags=tags).info.run_id
    assert train_run.end_superseded_tries(client, retry, tags) == [killed]
    assert client.get_run(killed).data.tags[train_run.SUPERSEDED_BY_TRY_TAG] == "2"


def test_pod_without_a_snapshot_fails_at_once_naming_the_upstream_task(pod_operator):
    from airflow.sdk.exceptions import AirflowFailException

    pod_operator.snapshot = None
    with pytest.raises(AirflowFailException, match="collect_data"):
        pod_operator.execute({"run_id": "r"})


def test_pod_without_require_gpu_and_without_pvc(monkeypatch):
    from nightshift.operators.train_pod import TrainGPUPodOperator

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')
    op = TrainGPUPodOperator(task_id="t", image="img", namespace="default", snapshot={"snapshot_uri": "/s"},
                             require_gpu="false")
    pod = api_dict(op.build_pod_request_obj(None, dry_run=True))
    base = pod["spec"]["containers"][0]
    assert "--require-gpu" not in base["args"] and base["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert not any(v["name"] == "nightshift-artifacts" for v in pod["spec"].get("volumes", []))
    assert base["command"] == ["python", "-m", "nightshift.train_cli"]  # one GPU: one process, no torchrun


@pytest.mark.parametrize("code, fails_fast", [(2, True), (1, False), (137, False)])
def test_pod_exit_code_2_fails_without_retry(monkeypatch, code, fails_fast):
    """train_cli's exit 2 (configuration or data error) fails the task at once; other exits
    keep the DAG's retries (a retried pod resumes from last.pt)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowFailException
    from kubernetes.client import models as k8s

    from nightshift.operators.train_pod import TrainGPUPodOperator

    def provider_cleanup(self, pod, remote_pod, xcom_result=None, context=None):
        raise RuntimeError("Pod train-gpu returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", provider_cleanup)
    op = TrainGPUPodOperator(task_id="t", image="img", namespace="default", snapshot={"snapshot_uri": "/s"})
    remote = k8s.V1Pod(status=k8s.V1PodStatus(phase="Failed", container_statuses=[k8s.V1ContainerStatus(
        name="base", image="img", image_id="", ready=False, restart_count=0,
        state=k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code)))]))
    with pytest.raises(Exception) as info:
        op.cleanup(k8s.V1Pod(), remote)
    assert isinstance(info.value, AirflowFailException) is fails_fast
    if fails_fast:
        assert "configuration or data error" in str(info.value)
