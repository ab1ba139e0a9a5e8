"""Operator extra links: registered by the plugin, resolved on the API server side."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightshift.operators import links

from .conftest import DAG, MODEL


@pytest.fixture(scope="module")
def served_dag():
    """nightly_retrain as the API server sees it: serialized, then deserialized with the plugin loaded."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).dags[DAG]
    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


EXPECTED = {
    "validate_data": {"Validation report": links.ValidationReportLink},
    "train_gpu": {"MLflow run": links.MLflowRunLink},
    "export_onnx": {"Parity report": links.ParityReportLink, "Quantization report": links.QuantizationReportLink},
    "system_eval": {"System-eval report": links.SystemEvalReportLink},
    "drift_check": {"Drift report": links.DriftReportLink},
    "promote": {"Promotion decision": links.PromotionDecisionLink, "MLflow model version": links.ModelVersionLink,
                "Nightshift view": links.NightshiftViewLink},
}


def test_the_plugin_is_loaded_and_registers_every_link(served_dag):
    from airflow import plugins_manager

    registered = {type(link) for link in plugins_manager.get_operator_extra_links()}
    assert {cls for d in EXPECTED.values() for cls in d.values()} <= registered
    for task_id, expected in EXPECTED.items():
        got = served_dag.get_task(task_id).operator_extra_link_dict
        # the plugin's link (our get_link), not the generic XComOperatorLink
        assert {name: type(link) for name, link in got.items()} == expected, task_id


def _key(task_id, run_id):
    from airflow.models.taskinstancekey import TaskInstanceKey

    return TaskInstanceKey(dag_id=DAG, task_id=task_id, run_id=run_id)


def test_report_links_point_at_the_plugin_and_only_when_the_report_exists(world_env, monkeypatch):
    monkeypatch.setattr(links, "return_value", lambda key: None)
    v1 = world_env["versions"][0]
    key = _key("validate_data", v1["run_id"])
    rel = v1["folder"].relative_to(world_env["root"]).as_posix()
    assert links.ValidationReportLink().get_link(None, ti_key=key) == f"/nightshift/reports/{rel}/validation/validation.json"
    assert links.ParityReportLink().get_link(None, ti_key=key).endswith("/model/parity.json")
    assert links.SystemEvalReportLink().get_link(None, ti_key=key).endswith("/system_eval/system_eval.json")
    assert links.DriftReportLink().get_link(None, ti_key=key).endswith("/drift/drift_report.html")
    assert links.PromotionDecisionLink().get_link(None, ti_key=key).endswith("/promotion.json")
    assert links.ValidationReportLink().get_link(None, ti_key=_key("validate_data", "scheduled__never")) == ""


def test_report_link_falls_back_to_the_path_on_xcom_but_never_outside_the_root(world_env, monkeypatch, tmp_path):
    report = world_env["root"] / "drift" / MODEL / "2026-11-02T03" / "drift_report.html"
    monkeypatch.setattr(links, "return_value", lambda key: {"report_html": str(report)})
    key = _key("drift_check", "manual__elsewhere")
    assert links.DriftReportLink().get_link(None, ti_key=key) == \
        f"/nightshift/reports/drift/{MODEL}/2026-11-02T03/drift_report.html"
    (tmp_path / "x.html").write_text("x")
    monkeypatch.setattr(links, "return_value", lambda key: {"report_html": str(tmp_path / "x.html")})
    assert links.DriftReportLink().get_link(None, ti_key=key) == ""


def test_mlflow_links_come_from_the_task_return_value(world_env, monkeypatch):
    monkeypatch.setattr(links, "return_value", lambda key: {"run_id": "abc123", "model_name": MODEL, "version": "7"})
    assert links.MLflowRunLink().get_link(None, ti_key=_key("train_gpu", "r")) == "http://mlflow.example:5000/#/runs/abc123"
    assert links.ModelVersionLink().get_link(None, ti_key=_key("promote", "r")) == \
        f"http://mlflow.example:5000/#/models/{MODEL}/versions/7"
    monkeypatch.setattr(links, "return_value", lambda key: None)
    assert links.MLflowRunLink().get_link(None, ti_key=_key("train_gpu", "r")) == ""
    assert links.ModelVersionLink().get_link(None, ti_key=_key("promote", "r")) == ""


def test_return_value_reads_the_xcom_table_and_never_raises(monkeypatch):
    assert links.return_value(_key("train_gpu", "manual__no_such_run")) is None


def test_the_pod_operator_gets_the_plugins_mlflow_link_without_being_imported_up_front(monkeypatch):
    """TrainGPUPodOperator is imported on first use only; the plugin still registers its MLflow link
    (by the class's name and module), so the API server resolves it with MLflowRunLink.get_link."""
    import nightshift.operators as ops
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.sdk import DAG as SdkDag

    from nightshift.operators.train_pod import TrainGPUPodOperator

    # the declared entry is the real class and lists exactly its links
    (module, name), declared = next(iter(ops.LAZY_OPERATOR_LINKS.items()))
    assert (TrainGPUPodOperator.__module__, TrainGPUPodOperator.__name__) == (module, name)
    assert {type(link) for link in TrainGPUPodOperator.operator_extra_links} == set(declared)

    with SdkDag("pod_links", schedule=None) as dag:
        TrainGPUPodOperator(task_id="train_gpu", image="registry.local/nightshift:1", snapshot="s3://b/snap",
                            model_name="m", artifact_pvc="artifacts")
    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    got = served.get_task("train_gpu").operator_extra_link_dict
    assert {n: type(link) for n, link in got.items()} == {"MLflow run": links.MLflowRunLink}
