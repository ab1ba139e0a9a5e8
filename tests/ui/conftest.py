"""A small Nightshift world for the view: a real MLflow SQLite registry with two
versions (v1 champion, v2 rejected challenger), their run folders and reports, a
promotion history, a deployment state and a drift timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODEL = "nightshift-classifier"
DAG = "nightly_retrain"
T = {"min_accuracy": 0.5, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 200.0, "min_throughput_rps": 10.0,
     "served_accuracy_tolerance": 0.05, "champion_tolerance": 0.0, "champion_relative_tolerance": 0.0,
     "min_test_images": 100, "champion_alpha": 0.05}


def _version(c, root: Path, tmp: Path, n: int, acc: float, champion: dict | None) -> dict:
    from nightshift import registry
    from nightshift.artifacts import atomic_write_json, atomic_write_text, run_dir
    from nightshift.gates import Evidence, decide

    run_id = f"manual__2026-11-0{n}T02:00:00+00:00"
    folder = run_dir(root, DAG, run_id)
    atomic_write_json(folder / "validation/validation.json", {"success": True, "evaluated": 14, "failed": 0})
    atomic_write_json(folder / "model/parity.json", {"passed": True, "max_abs_diff": 1.2e-6, "top1_agreement": 1.0})
    atomic_write_json(folder / "system_eval/system_eval.json",
                      {"accuracy": acc, "latency_ms": {"p50": 2.0, "p95": 4.5, "p99": 6.0}, "errors": 0,
                       "latency_histogram_ms": {"edges": [1, 2, 3, 4, 5, 6, 7], "counts": [5, 40, 22, 9, 4, 1]}})
    atomic_write_text(folder / "drift/drift_report.html", f"<html><body><h1>Drift report v{n}</h1></body></html>")
    (tmp / f"onnx{n}").mkdir()
    (tmp / f"onnx{n}" / "model.onnx").write_bytes(b"onnx bytes")
    with registry.training_run(c, "nightshift", f"train-{n}", tags={}, params={"epochs": 1},
                               artifact_location=(tmp / "mlartifacts").as_uri()) as mlflow_run:
        registry.log_artifacts(c, mlflow_run, tmp / f"onnx{n}", "onnx")
    ev = Evidence(validation_passed=True, offline_accuracy=acc, parity_passed=True, served_accuracy=acc,
                  p95_latency_ms=4.5, serving_errors=0, champion_accuracy=champion["acc"] if champion else None,
                  champion_version=champion["version"] if champion else None, p99_latency_ms=6.0,
                  throughput_rps=400.0, test_images=400, served_images=400,
                  champion_only_correct=20 if champion else None, candidate_only_correct=0 if champion else None)
    decision = decide(f"cand{n}", ev, T)
    outcome = registry.register_candidate(
        c, MODEL, mlflow_run, artifact_path="onnx", decision=decision,
        tags={"offline_accuracy": acc, "served_accuracy": acc, "p95_latency_ms": 4.5, "dag_run": run_id,
              "image": f"nightshift/{MODEL}:v{n}", "image_id": f"sha256:{n:064d}", "data_digest": f"{n}" * 64,
              "onnx_sha256": f"{n}" * 64})
    atomic_write_json(folder / "promotion.json", outcome)
    return {"run_id": run_id, "mlflow_run": mlflow_run, "outcome": outcome, "folder": folder, "acc": acc,
            "version": outcome["version"]}


@pytest.fixture(scope="package")
def world(tmp_path_factory):
    """Build the world once; yields a dict with ``root``, ``tracking_uri``, ``versions``."""
    from nightshift import registry
    from nightshift.contracts import (CHALLENGER, HistoryEvent, append_history, deployment_path,
                                      drift_timeline_path)

    tmp = tmp_path_factory.mktemp("nightshift-world")
    root = tmp / "artifacts"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = registry.client(uri)
    v1 = _version(c, root, tmp, 1, 0.93, None)
    v2 = _version(c, root, tmp, 2, 0.88, {"acc": 0.93, "version": v1["version"]})
    c.set_registered_model_alias(MODEL, CHALLENGER, v2["version"])
    for v in (v1, v2):
        o = v["outcome"]
        append_history(root, HistoryEvent(
            model=MODEL, action="promoted" if o["promoted"] else "rejected", version=o["version"],
            previous_champion=o["previous_champion"], champion=o["champion"], reason=o["reason"],
            dag_id=DAG, run_id=v["run_id"], extra={"report": str(v["folder"] / "promotion.json")}))
    dp = deployment_path(root, MODEL)
    dp.parent.mkdir(parents=True, exist_ok=True)
    dp.write_text(json.dumps({"version": "1", "image": f"nightshift/{MODEL}:v1", "image_id": f"sha256:{1:064d}",
                              "url": "http://127.0.0.1:8501", "container": "nightshift-blue-0123456789ab",
                              "status": "serving", "since": "2026-11-01T02:10:00+00:00"}))
    tl = drift_timeline_path(root, MODEL)
    tl.parent.mkdir(parents=True, exist_ok=True)
    report = tl.parent / "2026-11-02T03" / "drift_report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><body><h1>Served traffic drift</h1></body></html>")
    points = [("2026-11-02T01:00:00+00:00", "not_enough_data", None, 12, None),
              ("2026-11-02T02:00:00+00:00", "ok", 0.1, 400, None),
              ("2026-11-02T03:00:00+00:00", "drift", 0.6, 420, str(report))]
    with open(tl, "w") as f:
        for t, status, share, n, rep in points:
            f.write(json.dumps({"time": t, "window_start": t, "window_end": t, "status": status,
                                "drifted_share": share, "n": n, "report": rep,
                                "message": "12 request(s) in this window, fewer than min_rows=100: no verdict"
                                if status == "not_enough_data" else None}) + "\n")
    models_file = tmp / "models.yaml"  # the view lists the models of the models file: this world's one
    models_file.write_text(f"models:\n  - {{name: {MODEL}, default: true}}\n")
    yield {"root": root, "tracking_uri": uri, "versions": [v1, v2], "tmp": tmp, "models_file": models_file}


@pytest.fixture
def world_env(world, monkeypatch):
    """Point Settings.from_env() at the world."""
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(world["root"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["tracking_uri"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("NIGHTSHIFT_MLFLOW_UI_URL", "http://mlflow.example:5000")
    monkeypatch.setenv("NIGHTSHIFT_MODELS_FILE", str(world["models_file"]))
    return world
