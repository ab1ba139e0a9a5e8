"""MLflow tracking and model registry: runs, the candidate's artifacts, the
``champion`` alias. Airflow-free; the operators call these functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nightshift.gates import Decision

CHAMPION = "champion"
TAG_PREFIX = "nightshift."

log = logging.getLogger(__name__)


def client(tracking_uri: str, registry_uri: str | None = None):
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri or tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def experiment_id(c, name: str, artifact_location: str | None = None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - a concurrent run created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def training_run(c, experiment: str, run_name: str, *, tags: dict[str, str], params: dict[str, Any],
                 artifact_location: str | None = None) -> Iterator[str]:
    """Create an MLflow run, yield its id; mark it FINISHED or FAILED on exit."""
    exp_id = experiment_id(c, experiment, artifact_location)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    for k, v in params.items():
        c.log_param(run_id, k, v)
    try:
        yield run_id
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None and v == v]
    if batch:
        c.log_batch(run_id, metrics=batch)


def get_champion(c, model_name: str) -> dict[str, Any] | None:
    """The model version the ``champion`` alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags)}


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description="Image classifier retrained by Nightshift's nightly_retrain DAG.")
        except MlflowException:
            c.get_registered_model(name)  # created concurrently


def register_candidate(c, model_name: str, run_id: str, *, artifact_path: str, tags: dict[str, Any],
                       decision: Decision) -> dict[str, Any]:
    """Register the run's ONNX model as a new version, record the decision and every
    gate on it, and move ``champion`` only when the decision is BLESSED."""
    _ensure_registered_model(c, model_name)
    previous = get_champion(c, model_name)
    all_tags = {f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items() if v is not None}
    all_tags[f"{TAG_PREFIX}decision"] = decision.decision
    all_tags[f"{TAG_PREFIX}reason"] = decision.reason[:4900]
    all_tags[f"{TAG_PREFIX}baseline_version"] = str(decision.baseline or "none")
    for g in decision.gates:
        all_tags[f"gate.{g.name}"] = json.dumps({"passed": g.passed, "observed": g.observed, "threshold": g.threshold})
    source = f"runs:/{run_id}/{artifact_path}"
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=all_tags,
                                description=f"{decision.decision}: {decision.reason}"[:4900])
    version = str(mv.version)
    if decision.blessed:
        c.set_registered_model_alias(model_name, CHAMPION, version)
    before = previous["version"] if previous else None
    return {
        "model_name": model_name, "version": version, "promoted": decision.blessed, "decision": decision.decision,
        "reason": decision.reason, "previous_champion": before, "champion": version if decision.blessed else before,
    }


def log_artifacts(c, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    c.log_artifacts(run_id, str(local_dir), artifact_path)
