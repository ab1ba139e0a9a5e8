"""TrainGPUOperator (nightshift.operators.train) called directly: fail fast without the GPU it
requires, what it logs to MLflow (metrics, data lineage, plots), its data-parallel path (torchrun
with one process per GPU, "auto", or as asked), and ``train_task``, which picks the operator a
placement needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import (
    CollectDataOperator,
    TrainGPUOperator,
)
from nightshift.placement import TrainPlacement
from tests.unit.placement_support import K8S_ENV, api_dict, common_args

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One OpenMP thread per training process (the torchrun tests start several)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_auto_trains_in_process_without_several_gpus(monkeypatch):
    import nightshift.distributed as D

    op = TrainGPUOperator(task_id="train", snapshot={"snapshot_uri": "x"})
    monkeypatch.setattr(D, "gpu_count", lambda: 0)
    assert op._processes() == 1
    monkeypatch.setattr(D, "gpu_count", lambda: 4)
    assert op._processes() == 4  # one process per visible GPU


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_data_parallel_fails_without_retry(ctx, value):
    op = TrainGPUOperator(task_id="train", snapshot={"snapshot_uri": "x"}, data_parallel=value)
    with pytest.raises(AirflowFailException, match="data_parallel must be"):
        op.execute(ctx)


def test_two_processes_on_cpu_return_rank_zeros_result(ctx, digits_snapshot):
    op = TrainGPUOperator(task_id="train", snapshot={"snapshot_uri": str(digits_snapshot.path)}, data_parallel=2,
                          model_name="ddp-op", hparams={"epochs": 1, "width": 8, "batch_size": 64})
    out = op.execute(ctx)
    assert out["data_digest"] == digits_snapshot.digest and 0 < out["metrics"]["test_accuracy"] <= 1
    assert out["run_id"] and op.mlflow.get_run(out["run_id"]).info.status == "FINISHED"
    assert op.mlflow.get_run(out["run_id"]).data.tags["nightshift.task"] == "train"


def test_a_rank_config_error_fails_without_retry(ctx, digits_snapshot):
    op = TrainGPUOperator(task_id="train", snapshot={"snapshot_uri": str(digits_snapshot.path)}, data_parallel=2,
                          hparams={"epochs": 1, "batch_size": 3})  # fewer than 2 images per rank
    with pytest.raises(AirflowFailException, match="configuration or data error"):
        op.execute(ctx)


def test_train_require_gpu_fails_fast_without_cuda(ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, require_gpu=True, hparams={"epochs": 1})
    with pytest.raises(AirflowFailException, match="GPUUnavailable.*require_gpu=True"):
        op.execute(ctx)


def test_train_logs_to_mlflow(ctx):
    from nightshift import registry

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-test", hparams={"epochs": 2, "width": 8})
    out = op.execute(ctx)
    c = registry.client(op.settings.mlflow_tracking_uri)
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["metrics"]["test_accuracy"])
    assert len(c.get_metric_history(out["run_id"], "val_accuracy")) == 2
    assert run.data.tags["nightshift.data_digest"] == snap["digest"]


def test_train_records_data_lineage_and_plots_in_mlflow(ctx):
    """What a person sees in the MLflow run: the snapshot as dataset input, lineage tags (the
    code's git commit from the training manifest), the manifest and both figures; the resume
    state (last.pt) stays in the run folder."""
    from nightshift import registry
    from nightshift.lineage import git_sha

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    op = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-see", hparams={"epochs": 2, "width": 8})
    out = op.execute(ctx)
    c = registry.client(op.settings.mlflow_tracking_uri)
    run = c.get_run(out["run_id"])
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == snap["digest"][:36] and ds.dataset.source_type == "nightshift_snapshot"
    assert json.loads(ds.dataset.source)["uri"] == snap["snapshot_uri"]
    assert json.loads(ds.dataset.profile)["counts"]["total"] == 1797
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    tags = run.data.tags
    assert tags["nightshift.torch_version"] and tags["nightshift.device_name"]
    assert tags["mlflow.source.git.commit"] == tags["nightshift.git_sha"] == git_sha() != "unknown"
    listed = {f.path for f in c.list_artifacts(out["run_id"], "train")}
    assert {"train/train_manifest.json", "train/checkpoint.pt", "train/plots"} <= listed
    assert "train/last.pt" not in listed and (Path(out["train_dir"]) / "last.pt").is_file()
    assert {f.path for f in c.list_artifacts(out["run_id"], "train/plots")} == {
        "train/plots/curves.png", "train/plots/confusion_matrix.png"}


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
