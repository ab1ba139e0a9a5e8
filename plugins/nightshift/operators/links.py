"""Operator extra links: from a task instance to its report or its MLflow page.

Each operator lists its links in ``operator_extra_links`` (one class attribute);
the plugin (``plugins/nightshift_plugin.py``) registers the same links for those
operators, which makes Airflow's API server call :meth:`get_link` below (without
the plugin it would only look for a pushed ``_link_*`` XCom).

``get_link`` runs in the API server, never in a task: reports are found in the
run's artifact folder (``runs/<dag_id>/<run_id>/``, :data:`RUN_REPORTS`) or
through the task's ``return_value`` XCom, and are served by the plugin under
``/nightshift/reports/``; MLflow pages go to ``NIGHTSHIFT_MLFLOW_UI_URL``. A link
whose target does not exist (yet) is empty, which the UI shows disabled. With an
object-store artifact root the report is looked up in the store (one request) and
the XCom holds its URI.
Importing this module is cheap (no MLflow, no Airflow core).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from airflow.sdk import BaseOperatorLink

from nightshift.contracts import RUN_REPORTS

log = logging.getLogger(__name__)

#: Where the plugin mounts its FastAPI app.
URL_PREFIX = "/nightshift"


def plugin_url(path: str) -> str:
    """Absolute path (under ``[api] base_url``) of a route of the Nightshift app."""
    from urllib.parse import urlsplit

    try:
        from airflow.configuration import conf

        base = urlsplit(conf.get("api", "base_url", fallback="/") or "/").path
    except Exception:  # noqa: BLE001 - no Airflow config: serve from the root
        base = "/"
    return f"{base.rstrip('/')}{URL_PREFIX}/{path.lstrip('/')}"


def _in_task_runner() -> bool:
    """True inside a worker's task process (Airflow 3 computes extra links there after the task ran),
    where the metadata DB is out of reach and XComs come through the Task SDK."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:  # pragma: no cover - the SDK is part of Airflow 3
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


def return_value(ti_key: Any) -> Any:
    """The ``return_value`` XCom of a task instance: through the Task SDK in a worker's task process,
    from the metadata DB on the API server."""
    if _in_task_runner():
        try:
            from airflow.sdk.bases.xcom import BaseXCom

            return BaseXCom.get_one(key="return_value", dag_id=ti_key.dag_id, task_id=ti_key.task_id,
                                    run_id=ti_key.run_id, map_index=ti_key.map_index)
        except Exception:  # noqa: BLE001 - a link must never fail the task
            log.exception("could not read the return_value XCom of %s", ti_key)
            return None
    try:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.scalars(XComModel.get_many(
                run_id=ti_key.run_id, key="return_value", dag_ids=ti_key.dag_id, task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index, limit=1)).first()
            return XComModel.deserialize_value(row) if row is not None else None
    except Exception:  # noqa: BLE001 - a link must never break the task page
        log.exception("could not read the return_value XCom of %s", ti_key)
        return None


class NightshiftReportLink(BaseOperatorLink):
    """A report in the run's artifact folder, served by the Nightshift plugin."""

    name: ClassVar[str] = "Report"
    #: key of :data:`nightshift.contracts.RUN_REPORTS`
    report: ClassVar[str] = ""
    #: key in the task's return value that holds the report's path (fallback)
    xcom_path_key: ClassVar[str | None] = None

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from nightshift.settings import Settings
        from nightshift.ui.data import report_rel_path, run_folder

        settings = Settings.from_env()
        rel = None
        try:
            store = settings.store()
            root: Any = store
            if store.remote:
                from nightshift.artifacts import run_path

                report = run_path(store.local_root, ti_key.dag_id, ti_key.run_id) / RUN_REPORTS[self.report]
                if store.exists(store.rel(report) or ""):
                    rel = report_rel_path(store, store.to_uri(report))
            else:
                root = settings.artifact_root
                folder = run_folder(root, ti_key.run_id, ti_key.dag_id)
                if folder is not None:
                    rel = report_rel_path(root, folder / RUN_REPORTS[self.report])
            if rel is None and self.xcom_path_key:
                value = return_value(ti_key)
                if isinstance(value, dict):
                    rel = report_rel_path(root, value.get(self.xcom_path_key))
        except Exception:  # noqa: BLE001 - a link must never break the task page (store down, bad config)
            log.exception("could not find the %s report of %s", self.report, ti_key)
            return ""
        return plugin_url(f"reports/{rel}") if rel else ""


class ValidationReportLink(NightshiftReportLink):
    name = "Validation report"
    report = "validation"
    xcom_path_key = "report_path"


class ParityReportLink(NightshiftReportLink):
    name = "Parity report"
    report = "parity"


class QuantizationReportLink(NightshiftReportLink):
    name = "Quantization report"
    report = "quantization"


class SystemEvalReportLink(NightshiftReportLink):
    name = "System-eval report"
    report = "system_eval"


class DriftReportLink(NightshiftReportLink):
    name = "Drift report"
    report = "drift"
    xcom_path_key = "report_html"


class PromotionDecisionLink(NightshiftReportLink):
    name = "Promotion decision"
    report = "promotion"
    xcom_path_key = "report_path"


class MLflowRunLink(BaseOperatorLink):
    """The MLflow run whose id the task returned (``run_id``)."""

    name: ClassVar[str] = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from nightshift.ui.data import mlflow_run_url

        value = return_value(ti_key)
        run_id = value.get("run_id") if isinstance(value, dict) else None
        return mlflow_run_url(run_id) if run_id else ""


class ModelVersionLink(BaseOperatorLink):
    """The registered model version the task returned (``model_name``, ``version``)."""

    name: ClassVar[str] = "MLflow model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from nightshift.ui.data import mlflow_version_url

        value = return_value(ti_key)
        if not isinstance(value, dict) or not value.get("version") or not value.get("model_name"):
            return ""
        return mlflow_version_url(str(value["model_name"]), str(value["version"]))


class NightshiftViewLink(BaseOperatorLink):
    """The Nightshift view (models, gates, deployments, drift)."""

    name: ClassVar[str] = "Nightshift view"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return plugin_url("")


class ServedDriftReportLink(NightshiftReportLink):
    """drift_monitor's report of one traffic window (``drift/<model>/<run>/``)."""

    name = "Served-drift report"
    report = "drift"
    xcom_path_key = "report_html"
