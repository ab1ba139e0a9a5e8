"""The shape shared by the manual champion DAGs (``promote_model``, ``rollback_model``):
a version Param, a required reason, ``set_champion`` then ``deploy``. Cheap to import.

``set_champion`` does the whole move in the model's champion lock (check the target
can be deployed, serve it, move the alias with a compare-and-set); ``deploy`` then
reconciles once more (a no-op when the port already serves the champion; it renders
the manifests for the kubernetes target)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param

from nightshift.operators.champion import SetChampionOperator
from nightshift.operators.deploy import DeployModelOperator
from nightshift.placement import DockerPlacement


def champion_dag(*, dag_id: str, description: str, doc_md: str, action: str, version_param: str,
                 version: Param, reason_description: str) -> DAG:
    """A manual DAG that moves ``champion`` (``action``: forced / rolled_back) and redeploys.

    Both tasks talk to the Docker daemon: they go to ``NIGHTSHIFT_DOCKER_QUEUE`` when it is set
    (read from the environment here, at parse time)."""
    docker = DockerPlacement.from_env().operator_kwargs()
    params: dict[str, Any] = {
        "model_name": Param("nightshift-digits", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            title="Registered model", description="MLflow registered model whose 'champion' alias moves"),
        version_param: version,
        "deploy_target": Param("docker", enum=["docker", "kubernetes", "none"], title="Deploy target",
                               description="docker: blue/green on this host; kubernetes: render the manifests; "
                                           "none: move the alias only"),
        "deploy_port": Param(8600, type="integer", minimum=1, maximum=65535, title="Serving port (docker)",
                             description="Stable port on 127.0.0.1 that clients of the champion use"),
        "reason": Param("", type="string", minLength=5, title="Reason (recorded)", description=reason_description),
    }
    with DAG(dag_id=dag_id, description=description, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
             max_active_runs=1, tags=["nightshift", "mlops", "manual"], doc_md=doc_md,
             render_template_as_native_obj=True, params=params,
             default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1)}) as dag:
        champion = SetChampionOperator(task_id="set_champion", model_name="{{ params.model_name }}",
                                       version="{{ params.%s }}" % version_param, reason="{{ params.reason }}",
                                       action=action, deploy_target="{{ params.deploy_target }}",
                                       port="{{ params.deploy_port }}", **docker)
        DeployModelOperator(task_id="deploy", promotion=champion.output, model_name="{{ params.model_name }}",
                            target="{{ params.deploy_target }}", port="{{ params.deploy_port }}", **docker)
    return dag
