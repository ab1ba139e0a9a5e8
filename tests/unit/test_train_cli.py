"""``python -m nightshift.train_cli`` for real, in a subprocess, as the training pod runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, tmp_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), "NIGHTSHIFT_HOME": str(tmp_path / "home"),
           "NIGHTSHIFT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    return subprocess.run([sys.executable, "-m", "nightshift.train_cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


def test_cli_trains_one_epoch_and_writes_the_xcom_result(digits_snapshot, tmp_path):
    result_path = tmp_path / "xcom" / "return.json"
    out_dir = tmp_path / "artifacts" / "runs" / "train"
    proc = run_cli(["--snapshot-uri", str(digits_snapshot.path), "--out-dir", str(out_dir),
                    "--hparams", json.dumps({"epochs": 1, "width": 8, "lr": None}), "--model-name", "cli-test",
                    "--run-name", "manual__cli", "--tag", "nightshift.dag_id=nightly_retrain",
                    "--result-path", str(result_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    from nightshift.train_run import RESULT_KEYS

    assert set(result) == set(RESULT_KEYS)
    assert result["data_digest"] == digits_snapshot.digest and result["train_dir"] == str(out_dir)
    assert Path(result["checkpoint"]).is_file() and 0 < result["metrics"]["test_accuracy"] <= 1
    assert (out_dir / "plots" / "curves.png").is_file()

    from nightshift import registry

    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "manual__cli"
    assert run.data.tags["nightshift.dag_id"] == "nightly_retrain"
    assert run.data.params["epochs"] == "1"
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == digits_snapshot.digest[:36]


@pytest.mark.parametrize("args, message", [
    (["--snapshot-uri", "/nonexistent/snapshot", "--out-dir", "o"], "DataError: /nonexistent/snapshot is not"),
    (["--snapshot-uri", "s", "--out-dir", "o", "--hparams", "{epochs: 1}"], "--hparams is not valid JSON"),
    (["--out-dir", "o"], "--snapshot-uri"),
])
def test_cli_config_and_data_errors_exit_2_with_the_reason_on_stderr(tmp_path, args, message):
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def test_cli_bad_hyperparameter_exits_2(digits_snapshot, tmp_path):
    proc = run_cli(["--snapshot-uri", str(digits_snapshot.path), "--out-dir", str(tmp_path / "o"),
                    "--hparams", '{"epoch": 1}'], tmp_path)
    assert proc.returncode == 2 and "ConfigError: unknown hyperparameter(s) ['epoch']" in proc.stderr


def test_torchrun_two_processes_train_data_parallel_on_cpu(digits_snapshot, tmp_path):
    """`torchrun --nproc_per_node=2` (Gloo on CPU, as NCCL would on GPUs): both ranks train on
    their halves of each global batch; rank 0 alone records the MLflow run and writes the files."""
    from nightshift.distributed import launch_command

    result_path = tmp_path / "xcom" / "return.json"
    out_dir = tmp_path / "artifacts" / "runs" / "ddp"
    args = ["--snapshot-uri", str(digits_snapshot.path), "--out-dir", str(out_dir),
            "--hparams", json.dumps({"epochs": 2, "width": 8, "batch_size": 64}), "--model-name", "ddp-test",
            "--run-name", "manual__ddp", "--result-path", str(result_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), "NIGHTSHIFT_HOME": str(tmp_path / "home"),
           "NIGHTSHIFT_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    proc = subprocess.run(launch_command(2, args), capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_path.read_text())
    manifest = json.loads((out_dir / "train_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed_backend"] == "gloo"
    assert result["metrics"]["test_accuracy"] > 0.5  # 10 classes: well above chance after 2 epochs
    assert "rank 1 of 2" in proc.stderr and "rank 0 of 2" in proc.stderr

    from nightshift import registry

    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("ddp-test").experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # one MLflow run, not one per rank
