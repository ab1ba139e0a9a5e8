"""sweep_train in a small DAG of its own, run with dag.test() on the bundled digits.

One sweep of three trials where one trial fails (crop_pad 8 on 8x8 images: a configuration error
at training time, no retry) below the threshold: the trials are mapped task instances, each an
MLflow child run of one parent, the winner is the best on validation, the failed trial is
recorded and marked failed, the test split is read only by select_trial, after the pick. A second
sweep where two of three fail, above the threshold: select_trial fails listing them, the parent
run is FAILED and nothing downstream runs.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

MODEL = "sweep-dag-digits"
BASE = {"epochs": 2, "width": 8, "model": "small_cnn"}


def sweep_dag(dag_id: str, sweep: dict):
    """collect_data ─► validate_data ─► [sweep_trials ─► train_gpu[i] ─► select_trial] ─► export_onnx
    (validate and export stand-ins: an empty task and a @task that returns what it got)."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import dag, task

    from nightshift.operators import CollectDataOperator
    from nightshift.operators.sweep import sweep_train
    from nightshift.placement import TrainPlacement

    @dag(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         default_args={"retries": 0}, render_template_as_native_obj=True, tags=["test"])
    def make():
        collect = CollectDataOperator(task_id="collect_data", source="bundled")
        validate = EmptyOperator(task_id="validate_data")
        train = sweep_train(TrainPlacement(), sweep=sweep, snapshot=collect.output, model_name=MODEL,
                            hparams=dict(BASE), require_gpu=False)

        @task
        def export_onnx(training: dict) -> dict:
            return training

        collect >> validate >> train
        export_onnx(train.output)

    return make()


@pytest.fixture
def env(tmp_path, monkeypatch):
    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite") and not db.exists():
        pytest.fail(f"Airflow metadata DB {db} does not exist: run `make setup` (or `make test`) first")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def split_reads(monkeypatch):
    """``(task_id, map_index, split)`` for every split the snapshot reader hands out pixels of."""
    from airflow.sdk import get_current_context

    from nightshift.data.snapshot import Snapshot

    reads: list[tuple[str, int, str]] = []
    real = Snapshot.iter_split

    def spy(self, name):
        try:
            ti = get_current_context()["ti"]
            who = (ti.task_id, ti.map_index)
        except Exception:  # noqa: BLE001 - outside a task
            who = ("?", -1)
        reads.append((*who, name))
        return real(self, name)

    monkeypatch.setattr(Snapshot, "iter_split", spy)
    return reads


def run(dag):
    """dag.test() of ``dag`` (from :func:`dag_file`); returns the run and ``{(task_id, map_index): state}``."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    dr = dag.test()
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                                 TaskInstance.run_id == dr.run_id).all()
        return dr, {(ti.task_id, ti.map_index): str(ti.state) for ti in tis}


@pytest.fixture
def dag_file(tmp_path, monkeypatch):
    """``make(dag_id, sweep)``: the sweep DAG written as a DAG file into a folder of its own, loaded
    from there and serialized into the metadata DB (dag.test() runs the serialized DAG)."""

    def make(dag_id: str, sweep: dict):
        from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

        folder = tmp_path / "dags"
        folder.mkdir(exist_ok=True)
        (folder / f"{dag_id}.py").write_text(
            "# an airflow DAG file (the DagBag reads only files that say so)\n"
            "from tests.dags.test_sweep_dag import sweep_dag\n"
            f"dag = sweep_dag({dag_id!r}, {sweep!r})\n")
        bag = DagBag(dag_folder=str(folder))
        assert not bag.import_errors, bag.import_errors
        # serialized under the DAGs-folder bundle, as the DAG processor would (dag.test() re-syncs the
        # bundle's own folder, which does not hold this file, and finds this version in the DB)
        sync_bag_to_db(bag, "dags-folder", None)
        return bag.dags[dag_id]

    return make


def xcom(dag_id: str, run_id: str, task_id: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.run_id == run_id,
                                              XComModel.task_id == task_id, XComModel.key == "return_value").first()
        return None if row is None else XComModel.deserialize_value(row)


def mlflow_runs():
    from mlflow.tracking import MlflowClient

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name(MODEL)
    return c.search_runs([exp.experiment_id], max_results=100)


def test_the_sweep_builds_a_mapped_train_gpu_between_validation_and_export(env):
    dag = sweep_dag("sweep_shape", {"space": {"lr": [0.003, 0.01]}, "max_parallel": 3})
    trials, train, select = (dag.get_task(t) for t in ("sweep_trials", "train_gpu", "select_trial"))
    assert type(train).__name__ == "MappedOperator"
    assert train.partial_kwargs["pool"] == "nightshift_gpu"
    assert train.partial_kwargs["max_active_tis_per_dagrun"] == 3
    assert trials.upstream_task_ids == {"validate_data"}  # `validate >> group` reaches the first task
    assert select.upstream_task_ids >= {"train_gpu", "sweep_trials"} and select.trigger_rule == "all_done"
    assert dag.get_task("export_onnx").upstream_task_ids == {"select_trial"}
    from airflow.serialization.serialized_objects import DagSerialization

    assert "train_gpu_sweep" in json.dumps(DagSerialization.to_dict(dag), default=str)  # the group serializes


def test_the_trainer_pod_placement_is_refused_with_a_clear_error():
    from nightshift.errors import ConfigError
    from nightshift.operators.sweep import sweep_train
    from nightshift.placement import TrainPlacement

    with pytest.raises(ConfigError, match="kubernetes_pod"):
        sweep_train(TrainPlacement(kind="kubernetes_pod", image="x"), sweep={"space": {"lr": [0.1]}},
                    snapshot={}, model_name=MODEL, hparams={})


def test_a_bad_sweep_entry_fails_when_the_dag_is_built_naming_the_field():
    from nightshift.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sweep\.space\.lr"):
        sweep_dag("sweep_bad", {"space": {"lr": []}})


def test_a_sweep_tolerates_a_failed_trial_and_picks_its_winner_on_validation(env, dag_file, split_reads):
    from nightshift.train_run import PARENT_TAG

    dag = dag_file("sweep_ok", {"method": "grid", "max_failed": 1, "space": {"crop_pad": [1, 8, 0]}})
    dr, states = run(dag)
    assert str(dr.state) == "success", states
    assert [states[("train_gpu", i)] for i in range(3)] == ["success", "failed", "success"]
    assert states[("select_trial", -1)] == "success" and states[("export_onnx", -1)] == "success"

    # every trial a child run of one parent; the failed one recorded as FAILED
    runs = mlflow_runs()
    parents = [r for r in runs if r.data.tags.get("nightshift.sweep_parent") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    children = {int(r.data.tags["nightshift.sweep_trial"]): r for r in runs
                if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    assert sorted(children) == [0, 1, 2]
    assert children[1].info.status == "FAILED"
    assert {children[i].info.status for i in (0, 2)} == {"FINISHED"}
    assert all("test_accuracy" not in children[i].data.metrics or children[i].data.tags.get("nightshift.sweep_winner")
               for i in (0, 2))

    # the winner is the best on validation (ties: lower index); downstream gets train_gpu's XCom shape
    vals = {i: children[i].data.metrics["val_accuracy"] for i in (0, 2)}
    best = min(vals, key=lambda i: (-vals[i], i))
    out = xcom(dag.dag_id, dr.run_id, "export_onnx")
    assert out["sweep"]["trial"] == best and out["run_id"] == children[best].info.run_id
    assert {"run_id", "checkpoint", "metrics", "device", "train_dir", "data_digest"} <= set(out)
    assert out["metrics"]["val_accuracy"] == pytest.approx(vals[best])
    assert 0 < out["metrics"]["test_accuracy"] <= 1 and out["sweep"]["failed"] == [1]
    assert Path(out["checkpoint"]).is_file() and Path(out["checkpoint"]).parent.name == f"{best:03d}"
    winner_run = next(r for r in mlflow_runs() if r.info.run_id == out["run_id"])
    assert winner_run.data.metrics["test_accuracy"] == pytest.approx(out["metrics"]["test_accuracy"])

    # the parent has the winner and the trial table, and finished
    parent = next(r for r in mlflow_runs() if r.info.run_id == parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["nightshift.sweep_winner"] == str(best)
    assert parent.data.metrics["trials_failed"] == 1
    run_folder = Path(out["train_dir"]).parents[2]
    table = json.loads((run_folder / "train" / "sweep" / "trials.json").read_text())
    assert [t["failed"] for t in table["trials"]] == [False, True, False]
    assert "crop_pad" in table["trials"][1]["error"]
    assert json.loads((run_folder / "train" / "train_manifest.json").read_text())["sweep_trial"] == best

    # each trial in its own folder (a retry resumes from its last.pt); the failed one left its error
    for i in (0, 2):
        assert (run_folder / "train" / "trials" / f"{i:03d}" / "last.pt").is_file()
    failed = json.loads((run_folder / "train" / "trials" / "001" / "trial.json").read_text())
    assert failed["failed"] and "ConfigError" in failed["error"] and "crop_pad" in failed["error"]

    # the test split: never read by a trial; read only by select_trial, after the pick
    trial_reads = {split for task, _i, split in split_reads if task == "train_gpu"}
    assert trial_reads == {"train", "val"}
    test_readers = {task for task, _i, split in split_reads if split == "test"}
    assert test_readers == {"select_trial"}
    first_test = next(k for k, r in enumerate(split_reads) if r[2] == "test")
    assert all(r[0] != "train_gpu" for r in split_reads[first_test:])


def test_too_many_failed_trials_fail_the_sweep_with_the_list(env, dag_file):
    dag = dag_file("sweep_too_many", {"method": "grid", "max_failed": 1, "space": {"crop_pad": [8, 1, 9]}})
    dr, states = run(dag)
    assert str(dr.state) == "failed"
    assert [states[("train_gpu", i)] for i in range(3)] == ["failed", "success", "failed"]
    assert states[("select_trial", -1)] == "failed"
    assert states[("export_onnx", -1)] == "upstream_failed"  # nothing goes on to the gates
    parent = next(r for r in mlflow_runs() if r.data.tags.get("nightshift.sweep_parent") == "true")
    assert parent.info.status == "FAILED"
    error = parent.data.tags["nightshift.sweep_error"]
    assert "2 of 3 sweep trials failed" in error and "trial 0" in error and "trial 2" in error


def test_a_model_with_a_sweep_in_the_models_file_gets_the_mapped_trials_in_its_nightly_dag(tmp_path, monkeypatch):
    """The real builder in the generated Dag (dags/nightly_retrain.py): the sweep group sits where
    train_gpu sat, between validation and export, and the Dag serializes."""
    from airflow.serialization.serialized_objects import DagSerialization

    from tests.dags.conftest import DAGS, parse_dags

    models = tmp_path / "models.yaml"
    models.write_text("models:\n"
                      "  - {name: nightshift-digits, default: true}\n"
                      "  - name: swept\n"
                      "    deploy: {port: 8611}\n"
                      "    sweep: {method: random, trials: 6, seed: 1, max_parallel: 3,\n"
                      "            space: {lr: {low: 0.001, high: 0.01, log: true}, batch_size: [64, 128]}}\n")
    dags, errors = parse_dags(monkeypatch, DAGS, ("NIGHTSHIFT_TRAIN_PLACEMENT", "_AIRFLOW_PARSING_CONTEXT_DAG_ID",
                                                  "_AIRFLOW_PARSING_CONTEXT_TASK_ID"),
                              NIGHTSHIFT_MODELS_FILE=str(models))
    assert errors == {}
    dag = dags["nightly_retrain__swept"]
    train = dag.get_task("train_gpu")
    assert type(train).__name__ == "MappedOperator" and train.partial_kwargs["max_active_tis_per_dagrun"] == 3
    assert "validate_data" in dag.get_task("sweep_trials").upstream_task_ids
    assert "select_trial" in dag.get_task("export_onnx").upstream_task_ids
    assert "train_gpu" not in dag.get_task("export_onnx").upstream_task_ids
    assert {"select_trial"} <= dag.get_task("promote").upstream_task_ids
    DagSerialization.to_dict(dag)
    assert type(dags["nightly_retrain"].get_task("train_gpu")).__name__ == "TrainGPUOperator"  # no sweep: as before
