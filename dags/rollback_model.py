"""
### rollback_model — put the previous champion back

Trigger with the model, a target version (or `previous`: the champion before
the current one, from the promotion history) and a **required reason**. The
move is recorded on the version (`nightshift.rolled_back_by`, `_reason`, `_at`,
`_from`) and in the promotion history; the restored champion is redeployed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from nightshift.operators import DeployModelOperator, SetChampionOperator

default_args = {"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1)}


@dag(
    dag_id="rollback_model",
    description="Manual: move champion back to the previous (or a chosen) version with a recorded reason",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["nightshift", "mlops", "manual"],
    doc_md=__doc__,
    render_template_as_native_obj=True,
    params={
        "model_name": Param("nightshift-digits", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            title="Registered model", description="MLflow registered model whose 'champion' alias moves"),
        "target": Param("previous", type="string", pattern=r"^(previous|v?[0-9]+)$", title="Roll back to",
                        description="'previous' (the champion before the current one) or a version number"),
        "deploy_target": Param("docker", enum=["docker", "kubernetes", "none"], title="Deploy target",
                                description="docker: blue/green on this host; kubernetes: render the manifests; "
                                            "none: move the alias only"),
        "deploy_port": Param(8600, type="integer", minimum=1, maximum=65535, title="Serving port (docker)",
                              description="Stable port on 127.0.0.1 that clients of the champion use"),
        "reason": Param("", type="string", minLength=5, title="Reason (recorded)",
                        description="What went wrong with the current champion"),
    },
)
def rollback_model():
    champion = SetChampionOperator(
        task_id="set_champion", model_name="{{ params.model_name }}", version="{{ params.target }}",
        reason="{{ params.reason }}", action="rolled_back",
    )
    DeployModelOperator(task_id="deploy", promotion=champion.output, model_name="{{ params.model_name }}",
                        target="{{ params.deploy_target }}", port="{{ params.deploy_port }}")


rollback_model()
