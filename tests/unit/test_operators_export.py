"""ExportONNXOperator (nightshift.operators.export): a bad setting fails before any work, and the
parity and batch checks are logged to MLflow."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


@pytest.mark.parametrize("kw, match", [
    ({"opset": 17}, "ONNX opset 17 is not supported"),
    ({"opset": "latest"}, "opset must be an integer"),
    ({"atol": 0}, "atol"),
    ({"min_top1_agreement": 1.5}, "min_top1_agreement"),
    ({"int8_max_accuracy_drop": -0.1}, "int8_max_accuracy_drop"),
])
def test_export_bad_config_fails_fast_before_any_work(ctx, kw, match):
    from nightshift.operators import ExportONNXOperator

    op = ExportONNXOperator(task_id="export", training=None, snapshot=None, **kw)
    with pytest.raises(AirflowFailException, match=f"ConfigError.*{match}"):
        op.execute(ctx)


def test_export_logs_parity_and_batch_checks_to_mlflow(ctx, candidate):
    from nightshift import registry

    export, train = candidate["export"], candidate["training"]
    assert export["variant"] == "fp32" and export["quantization"] is None
    assert set(export["parity"]["batch_checks"]) == {"1", "64"}
    assert export["model_meta"]["training_run_id"] == train["run_id"] and export["model_meta"]["opset"] == 20
    from nightshift.settings import Settings

    c = registry.client(Settings.from_env().mlflow_tracking_uri)
    metrics = c.get_run(train["run_id"]).data.metrics
    assert metrics["parity_passed"] == 1.0 and metrics["parity_batch1_passed"] == 1.0
    assert metrics["parity_batch64_passed"] == 1.0 and metrics["onnx_opset"] == 20
    assert metrics["parity_max_abs_diff"] == pytest.approx(export["parity"]["max_abs_diff_logits"])
    logged = {f.path for f in c.list_artifacts(train["run_id"], "onnx")}
    assert {"onnx/parity.json", "onnx/model.json", "onnx/model.onnx"} <= logged

    # quantize (templated strings, as the DAG's Params render them): report + metrics + artifact
    from nightshift.operators import ExportONNXOperator

    q_export = ExportONNXOperator(task_id="export", training=train, snapshot=candidate["snapshot"],
                                  model_name="op-promote", opset="20", quantize="True",
                                  int8_max_accuracy_drop="1.0").execute(ctx)
    q = q_export["quantization"]
    assert q["decision"] == "kept" and q_export["variant"] == "int8" and q_export["model_meta"]["variant"] == "int8"
    metrics = c.get_run(train["run_id"]).data.metrics
    assert metrics["int8_kept"] == 1.0 and metrics["int8_size_bytes"] == q["int8"]["size_bytes"]
    assert metrics["int8_accuracy_drop"] == pytest.approx(q["accuracy_drop"])
    logged = {f.path for f in c.list_artifacts(train["run_id"], "onnx")}
    assert {"onnx/quantization.json", "onnx/model.fp32.onnx"} <= logged
