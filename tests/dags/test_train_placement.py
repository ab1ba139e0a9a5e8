"""nightly_retrain places train_gpu as the environment says (the DAG file reads
NIGHTSHIFT_TRAIN_PLACEMENT & co. at parse time), and every placement serializes."""

from __future__ import annotations

import json

import pytest

from tests.dags.conftest import DAGS, parse_dags

DAG_FILE = DAGS / "nightly_retrain.py"
PLACEMENT_VARS = ("NIGHTSHIFT_TRAIN_PLACEMENT", "NIGHTSHIFT_GPU_QUEUE", "NIGHTSHIFT_TRAIN_EXECUTOR",
                  "NIGHTSHIFT_GPU_COUNT", "NIGHTSHIFT_GPU_NODE_SELECTOR", "NIGHTSHIFT_GPU_TOLERATIONS",
                  "NIGHTSHIFT_TRAIN_MEMORY", "NIGHTSHIFT_TRAIN_CPU", "NIGHTSHIFT_TRAINER_IMAGE",
                  "NIGHTSHIFT_ARTIFACT_PVC", "NIGHTSHIFT_K8S_NAMESPACE")


def parse(monkeypatch, **env):
    """Parse the DAG file afresh with exactly these placement variables; return (dag, import_errors)."""
    dags, errors = parse_dags(monkeypatch, DAG_FILE, PLACEMENT_VARS, **env)
    return dags.get("nightly_retrain"), errors


def serializes(dag) -> dict:
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.to_dict(dag)


def test_default_is_local_as_before(monkeypatch):
    dag, errors = parse(monkeypatch)
    assert errors == {}
    train = dag.get_task("train_gpu")
    assert type(train).__name__ == "TrainGPUOperator"
    assert train.queue == "default" and train.executor_config == {} and train.pool == "nightshift_gpu"


def test_celery_queue_from_the_environment(monkeypatch):
    dag, errors = parse(monkeypatch, NIGHTSHIFT_TRAIN_PLACEMENT="celery", NIGHTSHIFT_GPU_QUEUE="gpu")
    assert errors == {}
    assert dag.get_task("train_gpu").queue == "gpu"
    assert dag.get_task("export_onnx").queue == "default"  # only training moves


def test_kubernetes_executor_pod_override_from_the_environment(monkeypatch):
    from kubernetes.client import ApiClient

    dag, errors = parse(monkeypatch, NIGHTSHIFT_TRAIN_PLACEMENT="kubernetes_executor",
                        NIGHTSHIFT_GPU_NODE_SELECTOR='{"pool": "gpu"}',
                        NIGHTSHIFT_GPU_TOLERATIONS='[{"key": "nvidia.com/gpu", "operator": "Exists"}]')
    assert errors == {}
    pod = ApiClient().sanitize_for_serialization(dag.get_task("train_gpu").executor_config["pod_override"])
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "nvidia.com/gpu" in json.dumps(serializes(dag), default=str)


def test_kubernetes_pod_swaps_in_the_pod_operator_with_the_same_contract(monkeypatch):
    dag, errors = parse(monkeypatch, NIGHTSHIFT_TRAIN_PLACEMENT="kubernetes_pod",
                        NIGHTSHIFT_TRAINER_IMAGE="registry.local/nightshift:1", NIGHTSHIFT_ARTIFACT_PVC="artifacts")
    assert errors == {}
    train = dag.get_task("train_gpu")
    assert type(train).__name__ == "TrainGPUPodOperator" and train.do_xcom_push and train.pool == "nightshift_gpu"
    assert train.image == "registry.local/nightshift:1" and train.artifact_pvc == "artifacts"
    assert dag.get_task("export_onnx").upstream_task_ids >= {"train_gpu"}
    assert dag.get_task("train_gpu").upstream_task_ids >= {"validate_data", "collect_data"}
    serializes(dag)


@pytest.mark.parametrize("env, variable", [
    ({"NIGHTSHIFT_TRAIN_PLACEMENT": "kubernetes_pod"}, "NIGHTSHIFT_TRAINER_IMAGE"),
    ({"NIGHTSHIFT_TRAIN_PLACEMENT": "celery", "NIGHTSHIFT_GPU_TOLERATIONS": "nope"}, "NIGHTSHIFT_GPU_TOLERATIONS"),
])
def test_a_bad_placement_is_an_import_error_that_names_the_variable(monkeypatch, env, variable):
    dag, errors = parse(monkeypatch, **env)
    assert dag is None and variable in "".join(errors.values())
