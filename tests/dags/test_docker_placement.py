"""The Docker-bound tasks go to the queue of the worker that has the daemon when
NIGHTSHIFT_DOCKER_QUEUE is set (the DAG files read it at parse time), and stay on
Airflow's default queue when it is not (``make run``, the LocalExecutor)."""

from __future__ import annotations

from tests.dags.conftest import DAGS, parse_dags

DOCKER_VARS = ("NIGHTSHIFT_DOCKER_QUEUE", "NIGHTSHIFT_DOCKER_CONN_ID")
#: Every task that talks to the Docker daemon or reads what its host holds, per DAG (drift_monitor's
#: check reads the request log the serving container writes on the Docker host).
DOCKER_TASKS = {
    "nightly_retrain": {"build_inference_image", "system_eval", "finalize_promotion", "deploy"},
    "promote_model": {"set_champion", "deploy"},
    "rollback_model": {"set_champion", "deploy"},
    "drift_monitor": {"check_served_drift"},
}


def parse(monkeypatch, **env):
    """Parse the DAG folder afresh with exactly these Docker variables; return (dags, import_errors)."""
    return parse_dags(monkeypatch, DAGS, DOCKER_VARS, **env)


def queues(dags) -> dict[str, dict[str, str]]:
    return {dag_id: {t.task_id: t.queue for t in dags[dag_id].tasks} for dag_id in DOCKER_TASKS}


def test_docker_tasks_go_to_the_configured_queue_and_stay_on_the_default_one_when_unset(monkeypatch):
    from airflow.serialization.serialized_objects import DagSerialization

    dags, errors = parse(monkeypatch, NIGHTSHIFT_DOCKER_QUEUE="docker")
    assert errors == {}
    for dag_id, by_task in queues(dags).items():
        on_docker = {t for t, q in by_task.items() if q == "docker"}
        assert on_docker == DOCKER_TASKS[dag_id], dag_id
        assert {q for t, q in by_task.items() if t not in on_docker} <= {"default"}, dag_id  # nothing else moves
    # the queue survives serialization (what the scheduler reads)
    ser = DagSerialization.from_dict(DagSerialization.to_dict(dags["nightly_retrain"]))
    assert ser.get_task("system_eval").queue == "docker" and ser.get_task("train_gpu").queue == "default"

    # unset (make run, the LocalExecutor): every task stays on Airflow's default queue
    dags, errors = parse(monkeypatch)
    assert errors == {}
    for dag_id, by_task in queues(dags).items():
        assert set(by_task.values()) == {"default"}, dag_id


def test_docker_queue_and_gpu_queue_are_independent(monkeypatch):
    dags, errors = parse(monkeypatch, NIGHTSHIFT_DOCKER_QUEUE="docker", NIGHTSHIFT_TRAIN_PLACEMENT="celery",
                         NIGHTSHIFT_GPU_QUEUE="gpu")
    assert errors == {}
    dag = dags["nightly_retrain"]
    assert dag.get_task("train_gpu").queue == "gpu" and dag.get_task("deploy").queue == "docker"
    assert dag.get_task("export_onnx").queue == "default"


def test_a_malformed_docker_queue_is_an_import_error_that_names_the_variable(monkeypatch):
    dags, errors = parse(monkeypatch, NIGHTSHIFT_DOCKER_QUEUE="docker,default")
    assert "nightly_retrain" not in dags and "rollback_model" not in dags
    assert "NIGHTSHIFT_DOCKER_QUEUE" in "".join(errors.values())


def test_the_connection_is_not_baked_into_the_dag(monkeypatch):
    """The connection id is the worker's to resolve when the task runs (its environment or the
    operator argument): parsing does no connection lookup and records none."""
    dags, errors = parse(monkeypatch, NIGHTSHIFT_DOCKER_CONN_ID="docker_host")
    assert errors == {}
    task = dags["nightly_retrain"].get_task("deploy")
    assert "docker_conn_id" in task.template_fields and task.docker_conn_id is None
