"""The manual champion DAGs' shape (nightshift.dags.champion): a version Param, a required reason,
``set_champion`` then ``deploy``, both on the Docker queue when one is set. The DAG files built
from it (promote_model, rollback_model) are parsed in tests/dags."""

from __future__ import annotations

import pytest
from airflow.sdk import Param

from nightshift.dags.champion import champion_dag


def _dag(**over):
    kw = dict(dag_id="move_champion", description="d", doc_md="doc", action="forced", version_param="version",
              version=Param("", type="string"), reason_description="why")
    return champion_dag(**(kw | over))


def test_set_champion_then_deploy_with_the_version_param_templated_in(monkeypatch):
    monkeypatch.delenv("NIGHTSHIFT_DOCKER_QUEUE", raising=False)
    dag = _dag(version_param="to_version")
    assert sorted(dag.task_dict) == ["deploy", "set_champion"]
    assert dag.task_dict["deploy"].upstream_task_ids == {"set_champion"}
    move = dag.task_dict["set_champion"]
    assert move.version == "{{ params.to_version }}" and move.action == "forced"
    assert {"model_name", "to_version", "deploy_target", "deploy_port", "reason"} <= set(dag.params)
    assert dag.params.get_param("reason").schema["minLength"] == 5  # a reason is required, not a blank
    assert dag.schedule is None and dag.max_active_runs == 1


@pytest.mark.parametrize("queue", ["", "docker-host"])
def test_both_tasks_go_to_the_docker_queue_when_one_is_set(monkeypatch, queue):
    monkeypatch.setenv("NIGHTSHIFT_DOCKER_QUEUE", queue)
    dag = _dag()
    queues = {t.task_id: t.queue for t in dag.tasks}
    if queue:
        assert queues == {"set_champion": queue, "deploy": queue}
    else:
        assert queues["set_champion"] == queues["deploy"] != "docker-host"  # Airflow's default queue
