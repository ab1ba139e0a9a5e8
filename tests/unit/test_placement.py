"""Placement of train_gpu (nightshift.placement): configuration parsing, and the GPU pod override
a placement renders (dry run: no cluster, specs serialized as the Kubernetes API would receive
them). The training pod of the kubernetes_pod placement: test_operators_train_pod.py."""

from __future__ import annotations

import pytest

from nightshift.errors import ConfigError
from nightshift.placement import TrainPlacement, gpu_pod_override
from tests.unit.placement_support import GPU_TOLERATION, K8S_ENV, api_dict


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
