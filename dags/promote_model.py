"""
### promote_model — make a chosen model version the champion, by hand

For the cases the gates cannot judge (a new class, a changed metric, an
emergency). Trigger it with the model, the version and a **required reason**;
the move is recorded on the version (`nightshift.forced_by`, `_reason`, `_at`,
`_from`) and in the promotion history the Nightshift view shows. The new
champion is then deployed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from nightshift.operators import DeployModelOperator, SetChampionOperator

default_args = {"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1)}


@dag(
    dag_id="promote_model",
    description="Manual: force a model version to champion with a recorded reason, then deploy it",
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
        "version": Param("", type="string", pattern=r"^v?[0-9]+$", title="Version to make champion",
                         description="A registered version number, e.g. 7"),
        "deploy_target": Param("docker", enum=["docker", "kubernetes", "none"], title="Deploy target",
                                description="docker: blue/green on this host; kubernetes: render the manifests; "
                                            "none: move the alias only"),
        "deploy_port": Param(8600, type="integer", minimum=1, maximum=65535, title="Serving port (docker)",
                              description="Stable port on 127.0.0.1 that clients of the champion use"),
        "reason": Param("", type="string", minLength=5, title="Reason (recorded)",
                        description="Why this version becomes champion without passing the gates"),
    },
)
def promote_model():
    champion = SetChampionOperator(
        task_id="set_champion", model_name="{{ params.model_name }}", version="{{ params.version }}",
        reason="{{ params.reason }}", action="forced",
    )
    DeployModelOperator(task_id="deploy", promotion=champion.output, model_name="{{ params.model_name }}",
                        target="{{ params.deploy_target }}", port="{{ params.deploy_port }}")


promote_model()
