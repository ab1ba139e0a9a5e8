"""What the whole-DAG tests share: running a DAG with dag.test() and reading its task states."""

from __future__ import annotations

from nightshift.containers import free_port  # noqa: F401 - the one free-port helper, for the tests here
from nightshift.containers import free_port_pair as free_deploy_port  # noqa: F401 - REST + gRPC (port + 1)


def run_dag(dag, conf):
    """``dag.test(run_conf=conf)``; returns the run and ``{task_id: state}``."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    dr = dag.test(run_conf=conf)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                                 TaskInstance.run_id == dr.run_id).all()
        return dr, {ti.task_id: str(ti.state) for ti in tis}


def remove_images(repository: str) -> None:
    """The images a test's runs built (their layers are shared; tags would pile up), and any
    container of theirs a run stopped half-way left behind."""
    import docker

    client = docker.from_env()
    for image in client.images.list(name=repository):
        for container in client.containers.list(all=True, filters={"ancestor": image.id}):
            container.remove(force=True)
        client.images.remove(image.id, force=True)
    client.close()
