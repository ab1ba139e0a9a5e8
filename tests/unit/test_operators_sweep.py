"""The sweep operators (nightshift.operators.sweep): a retried trial resumes as the same child run,
selection fails closed, trials run on several workers of an object store, and the operators load
lazily."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_a_retried_trial_resumes_from_its_own_checkpoint_and_stays_a_child_run(nightshift_home, digits_snapshot):
    from types import SimpleNamespace

    from nightshift import registry
    from nightshift.operators.sweep import SweepTrialOperator, trial_dir_parts
    from nightshift.settings import Settings
    from nightshift.train_run import PARENT_TAG, open_sweep_parent

    c = registry.client(Settings.from_env().mlflow_tracking_uri)
    tags = {"nightshift.dag_id": "d", "nightshift.run_id": "manual__r"}
    parent = open_sweep_parent(c, "sweep-op", "r sweep", tags=tags, params={"sweep.method": "grid"})
    assert open_sweep_parent(c, "sweep-op", "r sweep", tags=tags, params={}) == parent  # a retried trials task
    snap = {"snapshot_uri": str(digits_snapshot.path)}

    def trial_op():
        return SweepTrialOperator(task_id="train_gpu", snapshot=snap, model_name="sweep-op", trial=2,
                                  parent_run_id=parent, hparams={"epochs": 3, "width": 8})

    first = trial_op()

    def lost_worker(last):  # after epoch 1's last.pt is written: the worker goes away
        raise RuntimeError("worker lost")

    first._publish_resume_state = lost_worker
    with pytest.raises(RuntimeError, match="worker lost"):
        first.execute({"run_id": "manual__r", "ti": SimpleNamespace(try_number=1)})
    trial_dirs = list((nightshift_home / "artifacts" / "runs").glob("*/*/" + "/".join(trial_dir_parts(2))))
    assert len(trial_dirs) == 1 and (trial_dirs[0] / "last.pt").is_file()
    record = json.loads((trial_dirs[0] / "trial.json").read_text())
    assert record["failed"] and "worker lost" in record["error"] and record["try_number"] == 1

    second = trial_op()
    out = second.execute({"run_id": "manual__r", "ti": SimpleNamespace(try_number=2)})
    assert out["trial"] == 2 and Path(out["train_dir"]) == trial_dirs[0]
    manifest = json.loads((trial_dirs[0] / "train_manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == 1 and manifest["evaluated_test"] is False
    assert json.loads((trial_dirs[0] / "trial.json").read_text())["failed"] is False
    run = c.get_run(out["run_id"])
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags["nightshift.sweep_trial"] == "2"
    assert "test_accuracy" not in run.data.metrics and "val_accuracy" in run.data.metrics


def test_select_trial_fails_closed_when_the_trials_task_left_no_list(nightshift_home):
    from airflow.sdk.exceptions import AirflowFailException

    from nightshift.operators.sweep import SelectTrialOperator

    op = SelectTrialOperator(task_id="select_trial", trials=None, snapshot={"snapshot_uri": "x"},
                             sweep={"space": {"lr": [0.1, 0.2]}}, trial_task_id="train_gpu")
    assert op.trigger_rule == "all_done"
    with pytest.raises(AirflowFailException, match="no trial list"):
        op.execute({"run_id": "manual__r"})


def test_a_sweep_on_an_object_store_trials_on_two_workers_and_select_on_a_third(s3_server, s3_root, worker):
    """No shared folder: each task runs with an empty working copy of its own (as Celery workers
    would); the failed trial's record and the winner's files reach select_trial through the store."""
    from collections import defaultdict
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from nightshift.operators import CollectDataOperator
    from nightshift.operators.sweep import SelectTrialOperator, SweepTrialOperator, SweepTrialsOperator

    sweep = {"space": {"crop_pad": [1, 8]}, "max_failed": 1}
    ctx = {"run_id": "manual__s3sweep", "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}
    worker("a")
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    trials = SweepTrialsOperator(task_id="sweep_trials", sweep=sweep, hparams={"epochs": 1, "width": 4},
                                 model_name="s3-sweep").execute(ctx)
    results = {}
    worker("b")
    results[0] = SweepTrialOperator(task_id="train_gpu", snapshot=snap, model_name="s3-sweep", **trials[0]).execute(
        {**ctx, "ti": SimpleNamespace(try_number=1)})
    assert results[0]["checkpoint"].startswith(s3_root)
    worker("c")
    with pytest.raises(AirflowFailException, match="crop_pad"):
        SweepTrialOperator(task_id="train_gpu", snapshot=snap, model_name="s3-sweep", **trials[1]).execute(
            {**ctx, "ti": SimpleNamespace(try_number=1)})

    cache = worker("d")
    ti = SimpleNamespace(xcom_pull=lambda task_ids, map_indexes: results.get(map_indexes))
    out = SelectTrialOperator(task_id="select_trial", trials=trials, snapshot=snap, sweep=sweep,
                              trial_task_id="train_gpu", model_name="s3-sweep").execute({**ctx, "ti": ti})
    assert out["sweep"]["trial"] == 0 and out["sweep"]["failed"] == [1]
    assert out["checkpoint"] == results[0]["checkpoint"] and 0 < out["metrics"]["test_accuracy"] <= 1
    key = out["train_dir"].split("/", 3)[3].rsplit("/trials/", 1)[0]
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{key}/sweep/trials.json")["Body"].read()
    table = json.loads(body)
    assert table["trials"][1]["failed"] and "crop_pad" in table["trials"][1]["error"]  # from worker c's trial.json
    assert table["winner"]["trial"] == 0
    # select_trial fetched only what it read: the failed trial's record, the winner's checkpoint and
    # manifest; not the winner's resume checkpoint (last.pt) nor the rest of the trials' folders
    trials_dir = cache / s3_server.bucket / key / "trials"
    fetched = sorted(p.relative_to(trials_dir).as_posix() for p in trials_dir.rglob("*") if p.is_file())
    assert fetched == sorted([results[0]["checkpoint"].rsplit("/trials/", 1)[1], "000/train_manifest.json",
                              "001/trial.json"]), fetched


def test_the_sweep_operators_are_loaded_lazily_and_their_links_declared_for_the_plugin():
    code = ("import sys, nightshift.operators as ops; print('nightshift.operators.sweep' in sys.modules); "
            "print(ops.sweep_train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "nightshift.operators.sweep"]

    import nightshift.operators as ops
    from nightshift.operators import sweep

    for cls in (sweep.SweepTrialOperator, sweep.SelectTrialOperator):
        declared = ops.LAZY_OPERATOR_LINKS[(cls.__module__, cls.__name__)]
        assert {type(link) for link in cls.operator_extra_links} == set(declared)
