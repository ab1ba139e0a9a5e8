"""Placement of train_gpu: configuration parsing, and the pod specs each placement renders
(dry run: no cluster, specs serialized as the Kubernetes API would receive them)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nightshift.artifacts import run_dir
from nightshift.errors import ConfigError
from nightshift.placement import TrainPlacement, gpu_pod_override

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
K8S_ENV = {
    "NIGHTSHIFT_GPU_COUNT": "2",
    "NIGHTSHIFT_GPU_NODE_SELECTOR": '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
    "NIGHTSHIFT_GPU_TOLERATIONS": json.dumps([GPU_TOLERATION]),
    "NIGHTSHIFT_TRAIN_MEMORY": "16Gi",
    "NIGHTSHIFT_TRAIN_CPU": "4",
}


def api_dict(obj):
    """What the Kubernetes API would receive (camelCase keys, no None values)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def common_args(**over):
    args = dict(task_id="train_gpu", pool="nightshift_gpu", snapshot={"snapshot_uri": "/data/artifacts/snapshots/s1"},
                model_name="digits", require_gpu=True, hparams={"epochs": 3, "lr": None, "model": "small_cnn"})
    args.update(over)
    return args


def test_defaults_are_local_with_nothing_to_change():
    p = TrainPlacement.from_env({})
    assert p.kind == "local" and p.queue == "default" and p.gpus == 1
    assert p.operator_kwargs() == {}


def test_celery_placement_sets_only_the_queue():
    p = TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "celery", "NIGHTSHIFT_GPU_QUEUE": "gpu"})
    assert p.operator_kwargs() == {"queue": "gpu"}
    p = TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "Celery "})
    assert p.operator_kwargs() == {"queue": "default"}


@pytest.mark.parametrize("env, variable", [
    ({"NIGHTSHIFT_TRAIN_PLACEMENT": "gpu"}, "NIGHTSHIFT_TRAIN_PLACEMENT"),
    ({"NIGHTSHIFT_GPU_COUNT": "two"}, "NIGHTSHIFT_GPU_COUNT"),
    ({"NIGHTSHIFT_GPU_COUNT": "0"}, "NIGHTSHIFT_GPU_COUNT"),
    ({"NIGHTSHIFT_GPU_NODE_SELECTOR": "{pool: gpu}"}, "NIGHTSHIFT_GPU_NODE_SELECTOR"),
    ({"NIGHTSHIFT_GPU_NODE_SELECTOR": '{"gpus": 1}'}, "NIGHTSHIFT_GPU_NODE_SELECTOR"),
    ({"NIGHTSHIFT_GPU_TOLERATIONS": "[1]"}, "NIGHTSHIFT_GPU_TOLERATIONS"),
    ({"NIGHTSHIFT_GPU_TOLERATIONS": '[{"key": "a", "operator": "In"}]'}, r"NIGHTSHIFT_GPU_TOLERATIONS\[0\].operator"),
    ({"NIGHTSHIFT_GPU_TOLERATIONS": '[{"key": "a", "effect": "NoRun"}]'}, r"NIGHTSHIFT_GPU_TOLERATIONS\[0\].effect"),
    ({"NIGHTSHIFT_GPU_TOLERATIONS": '[{"keys": "a"}]'}, r"NIGHTSHIFT_GPU_TOLERATIONS\[0\] has unknown key"),
    ({"NIGHTSHIFT_TRAIN_MEMORY": "16 GB"}, "NIGHTSHIFT_TRAIN_MEMORY"),
    ({"NIGHTSHIFT_ARTIFACT_PVC": "My_Claim"}, "NIGHTSHIFT_ARTIFACT_PVC"),
    ({"NIGHTSHIFT_TRAIN_PLACEMENT": "kubernetes_pod"}, "NIGHTSHIFT_TRAINER_IMAGE"),
])
def test_bad_configuration_names_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        TrainPlacement.from_env(env)


def test_gpu_pod_override_requests_gpus_on_gpu_nodes():
    pod = api_dict(gpu_pod_override(2, node_selector={"pool": "gpu"}, tolerations=[GPU_TOLERATION],
                                    memory="16Gi", cpu="4"))
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "base" and "image" not in container  # the executor's template image stays
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "2", "memory": "16Gi"},
                                      "requests": {"memory": "16Gi", "cpu": "4"}}
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["tolerations"] == [GPU_TOLERATION]
    bare = api_dict(gpu_pod_override())
    assert bare["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert "nodeSelector" not in bare["spec"] and "tolerations" not in bare["spec"]


def test_kubernetes_executor_placement_gives_a_gpu_pod_override():
    p = TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "kubernetes_executor",
                                 "NIGHTSHIFT_TRAIN_EXECUTOR": "KubernetesExecutor",
                                 "NIGHTSHIFT_TRAINER_IMAGE": "registry.local/nightshift:cuda", **K8S_ENV})
    kwargs = p.operator_kwargs()
    assert kwargs["executor"] == "KubernetesExecutor" and "queue" not in kwargs
    pod = api_dict(kwargs["executor_config"]["pod_override"])
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "16Gi"}
    assert container["image"] == "registry.local/nightshift:cuda"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == [GPU_TOLERATION]


def test_train_task_local_celery_and_executor_give_train_gpu_operator():
    from nightshift.operators import TrainGPUOperator, train_task

    local = train_task(TrainPlacement.from_env({}), **common_args())
    assert type(local) is TrainGPUOperator and local.queue == "default" and local.executor_config == {}
    assert local.pool == "nightshift_gpu" and local.task_id == "train_gpu"
    celery = train_task(TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "celery",
                                                 "NIGHTSHIFT_GPU_QUEUE": "gpu-a100"}), **common_args())
    assert celery.queue == "gpu-a100"
    k8s = train_task(TrainPlacement.from_env({"NIGHTSHIFT_TRAIN_PLACEMENT": "kubernetes_executor", **K8S_ENV}),
                     **common_args())
    pod = api_dict(k8s.executor_config["pod_override"])
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


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
