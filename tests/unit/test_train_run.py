"""The training run's bookkeeping (nightshift.train_run): the figures it writes beside the run, the
lineage tags it sets, and the MLflow run a killed try left RUNNING, which the retry ends as KILLED
naming the try that took over (end_superseded_tries)."""

from __future__ import annotations

import pytest

from nightshift import train_run
from nightshift.train_run import lineage_tags


def test_lineage_tags_from_the_manifest():
    manifest = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                "versions": {"torch": "2.14.1", "cuda": "12.8"}, "lineage": {"git_sha": "abc123"}}
    assert lineage_tags(manifest) == {
        "nightshift.device_name": "NVIDIA H100 80GB HBM3", "nightshift.torch_version": "2.14.1",
        "nightshift.cuda_version": "12.8", "nightshift.git_sha": "abc123", "mlflow.source.git.commit": "abc123"}
    assert lineage_tags({"git": {"sha": "def"}})["nightshift.git_sha"] == "def"
    assert lineage_tags({"device": "cpu", "versions": {"torch": "2.14.1", "cuda": None}}) == {
        "nightshift.torch_version": "2.14.1"}


@pytest.mark.parametrize("uri, local", [
    ("http://mlflow:5000", False), ("https://mlflow.example", False),
    ("sqlite:////x/mlflow.db", True), ("/x/mlruns", True), ("postgresql://u@db/mlflow", True),
])
def test_mlflow_artifacts_go_to_the_server_when_there_is_one(uri, local, tmp_path):
    from nightshift.train_run import default_artifact_location

    got = default_artifact_location(uri, tmp_path)
    assert got == ((tmp_path / "mlartifacts").as_uri() if local else None)


def test_the_dataset_input_of_a_snapshot_names_its_digest_source_schema_and_counts(digits_snapshot):
    import json

    from nightshift.train_run import snapshot_dataset_fields

    fields = snapshot_dataset_fields(digits_snapshot, uri="s3://b/snapshots/x")
    assert fields["digest"] == digits_snapshot.digest and fields["source_type"] == "nightshift_snapshot"
    assert fields["name"].endswith("@" + digits_snapshot.digest[:12])
    assert json.loads(fields["source"])["uri"] == "s3://b/snapshots/x"
    schema = json.loads(fields["schema"])
    assert schema == {"image_shape": [8, 8, 1], "dtype": "uint8", "class_names": digits_snapshot.class_names}
    assert json.loads(fields["profile"])["counts"]["total"] == 1797
    assert json.loads(snapshot_dataset_fields(digits_snapshot)["source"])["uri"] == str(digits_snapshot.path)


TASK = {"nightshift.dag_id": "nightly_retrain", "nightshift.run_id": "manual__1", "nightshift.task": "train_gpu"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


@pytest.fixture
def experiment(client, request):
    return client.create_experiment(request.node.name,
                                    artifact_location=f"file:///tmp/nightshift-test-artifacts/{request.node.name}")


def run(client, experiment, status: str = "RUNNING", **tags: str) -> str:
    r = client.create_run(experiment, tags={**TASK, **tags})
    if status != "RUNNING":
        client.set_terminated(r.info.run_id, status)
    return r.info.run_id


def status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_a_killed_try_is_ended_as_killed_and_names_the_try_that_superseded_it(client, experiment):
    killed = run(client, experiment, **{train_run.TRY_TAG: "1"})
    retry = run(client, experiment, **{train_run.TRY_TAG: "2"})
    ended = train_run.end_superseded_tries(client, retry, {**TASK, train_run.TRY_TAG: "2"})
    assert ended == [killed]
    assert status(client, killed) == "KILLED" and status(client, retry) == "RUNNING"
    tags = client.get_run(killed).data.tags
    assert tags[train_run.SUPERSEDED_BY_TRY_TAG] == "2" and tags[train_run.SUPERSEDED_BY_RUN_TAG] == retry
    assert train_run.SUPERSEDED_BY_TRY_TAG not in client.get_run(retry).data.tags


def test_only_the_same_task_instance_s_running_runs_are_ended(client, experiment):
    """Other DAG runs, other tasks, finished or failed tries, another sweep trial and the sweep's parent
    run are left as they are."""
    keep = {
        "other dag run": run(client, experiment, **{"nightshift.run_id": "manual__2"}),
        "other task": run(client, experiment, **{"nightshift.task": "train_other"}),
        "finished try": run(client, experiment, status="FINISHED"),
        "failed try": run(client, experiment, status="FAILED"),
        "a sweep trial": run(client, experiment, **{"nightshift.sweep_trial": "0"}),
        "sweep parent": run(client, experiment, **{train_run.SWEEP_PARENT_TAG: "true"}),
    }
    before = {k: status(client, v) for k, v in keep.items()}
    retry = run(client, experiment)
    assert train_run.end_superseded_tries(client, retry, {**TASK, train_run.TRY_TAG: "2"}) == []
    assert {k: status(client, v) for k, v in keep.items()} == before


def test_a_sweep_trial_ends_only_its_own_earlier_try(client, experiment):
    mine = run(client, experiment, **{"nightshift.sweep_trial": "3"})
    other = run(client, experiment, **{"nightshift.sweep_trial": "4"})
    plain = run(client, experiment)
    tags = {**TASK, "nightshift.sweep_trial": "3", train_run.TRY_TAG: "2"}
    retry = run(client, experiment, **tags)
    assert train_run.end_superseded_tries(client, retry, tags) == [mine]
    assert (status(client, other), status(client, plain)) == ("RUNNING", "RUNNING")


def test_without_the_identifying_tags_nothing_is_ended_and_a_registry_error_only_logs(client, experiment, caplog):
    lone = run(client, experiment)
    retry = run(client, experiment)
    assert train_run.end_superseded_tries(client, retry, {"nightshift.dag_id": "nightly_retrain"}) == []
    assert status(client, lone) == "RUNNING"

    class Down:
        def get_run(self, run_id):
            raise ConnectionError("tracking server down")

    assert train_run.end_superseded_tries(Down(), retry, {**TASK}) == []
    assert "tracking server down" in caplog.text


def test_run_training_ends_the_killed_try_s_run_before_training(client, digits_snapshot, tmp_path):
    """The wiring: a retry's run_training ends the earlier try's RUNNING run (same experiment, the
    model name) and its own run finishes."""
    model = "superseded-wiring"
    exp = client.create_experiment(model, artifact_location=(tmp_path / "mlartifacts").as_uri())
    killed = client.create_run(exp, tags={**TASK, train_run.TRY_TAG: "1"}).info.run_id
    result = train_run.run_training(client, str(digits_snapshot.path), tmp_path / "train",
                                    {"epochs": 1, "width": 8, "lr": None}, model_name=model, run_name="manual__1",
                                    tags={**TASK, train_run.TRY_TAG: "2"})
    assert status(client, killed) == "KILLED" and status(client, result["run_id"]) == "FINISHED"
    assert client.get_run(killed).data.tags[train_run.SUPERSEDED_BY_RUN_TAG] == result["run_id"]
