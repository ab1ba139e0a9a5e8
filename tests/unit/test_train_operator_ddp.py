"""TrainGPUOperator's data-parallel path: torchrun with one process per GPU ("auto"), or as asked."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import TrainGPUOperator


@pytest.fixture
def ctx(nightshift_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return {"run_id": "manual__ddp"}


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
