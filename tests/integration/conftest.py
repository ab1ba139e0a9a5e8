"""What the whole-DAG tests share: running a DAG with dag.test() and reading its task states."""

from __future__ import annotations


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the stable serving port of a test deployment)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dag(dag, conf):
    """``dag.test(run_conf=conf)``; returns the run and ``{task_id: state}``."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    dr = dag.test(run_conf=conf)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                                 TaskInstance.run_id == dr.run_id).all()
        return dr, {ti.task_id: str(ti.state) for ti in tis}
