"""
### cluster_smoke

A two-task DAG the cluster-profile smoke test (`tests/cluster/test_cluster_smoke.py`) runs
on the CeleryExecutor: `write_object` on queue `default` writes an object to the S3
gateway and hands its **URI** on; `read_and_log` on queue `gpu` reads it back by that URI
and logs an MLflow run whose artifact the tracking server stores in the object store.
Each task also reports where it ran (worker name, working directory, AIRFLOW_HOME, its
process ancestry), so the test can tell which worker ran it.

Not part of the project's DAG collection: the test points every component's
`AIRFLOW__CORE__DAGS_FOLDER` at this folder.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

BUCKET = "nightshift-artifacts"


def _where() -> dict:
    """Which worker process tree this task runs in (read from this process, not from config)."""
    import os
    import socket

    chain, pid = [], os.getpid()
    while pid > 1:
        chain.append(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return {"worker": os.environ.get("NIGHTSHIFT_CLUSTER_WORKER"), "cwd": os.getcwd(),
            "airflow_home": os.environ.get("AIRFLOW_HOME"), "tmpdir": os.environ.get("TMPDIR"),
            "hostname": socket.getfqdn(), "pids": chain}


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"owner": "nightshift", "retries": 0},
    tags=["nightshift", "cluster-smoke"],
    doc_md=__doc__,
)
def cluster_smoke():
    @task(queue="default")
    def write_object(run_id: str | None = None) -> dict:
        import boto3  # endpoint and credentials from the worker's environment (AWS_ENDPOINT_URL_S3, ...)

        where = _where()
        key = f"cluster-smoke/{run_id}/payload.txt"
        body = f"written by {where['worker']} (pid {where['pids'][0]}) for {run_id}"
        boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=body.encode())
        return {"where": where, "uri": f"s3://{BUCKET}/{key}", "body": body}

    @task(queue="gpu")
    def read_and_log(written: dict) -> dict:
        import boto3
        import mlflow  # MLFLOW_TRACKING_URI: the tracking server over HTTP

        where = _where()
        bucket, key = written["uri"].removeprefix("s3://").split("/", 1)
        body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        mlflow.set_experiment("cluster-smoke")
        with mlflow.start_run() as run:
            mlflow.log_metric("payload_bytes", len(body))
            mlflow.log_text(body, "smoke/payload.txt")
        return {"where": where, "read": body, "mlflow_run_id": run.info.run_id,
                "artifact_uri": run.info.artifact_uri}

    read_and_log(write_object())


cluster_smoke()
