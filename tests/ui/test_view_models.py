"""The Nightshift view lists every model of the models file (also ones with no version yet), its
configuration, the file's problems, and each model's deadline misses."""

from __future__ import annotations

import textwrap

from nightshift import contracts, model_config
from nightshift.ui import data

from .conftest import MODEL


def _config(tmp_path, text):
    f = tmp_path / "models.yaml"
    f.write_text(textwrap.dedent(text))
    return model_config.load_models(f)


def test_configured_models_come_first_in_file_order_also_without_a_version(world, tmp_path):
    from nightshift import registry

    cfg = _config(tmp_path, f"""
        models:
          - {{name: fresh-model, description: Not trained yet, deploy: {{port: 8611}}, deadline: 2h}}
          - {{name: {MODEL}, default: true}}
          - {{name: broken, deploy: {{port: 70000}}}}
    """)
    o = data.build_overview(world["root"], registry.client(world["tracking_uri"]), configured=cfg)
    names = [m["name"] for m in o["models"]]
    assert names == ["fresh-model", MODEL]  # the broken entry is not a model; it is a config error
    fresh, trained = o["models"]
    assert fresh["versions"] == [] and fresh["champion"] is None and fresh["description"] == "Not trained yet"
    assert fresh["config"]["retrain_dag_id"] == "nightly_retrain__fresh-model"
    assert fresh["config"]["deploy_port"] == 8611 and fresh["config"]["deadline"] == "2h"
    assert trained["champion"] == "1" and trained["config"]["retrain_dag_id"] == "nightly_retrain"
    (err,) = o["config_errors"]
    assert "model 'broken', field 'deploy.port'" in err and o["models_file"] == str(tmp_path / "models.yaml")


def test_registered_models_missing_from_the_file_still_show(world, tmp_path):
    from nightshift import registry

    cfg = _config(tmp_path, "models:\n  - {name: other-model}\n")
    o = data.build_overview(world["root"], registry.client(world["tracking_uri"]), configured=cfg)
    assert [m["name"] for m in o["models"]] == ["other-model", MODEL]
    assert o["models"][1]["config"] is None and o["models"][1]["n_versions"] == 2


def test_deadline_misses_are_listed_newest_first_with_their_text(tmp_path):
    root = tmp_path / "artifacts"
    for run in ("scheduled__2026-12-01T02:00:00+00:00", "scheduled__2026-12-02T02:00:00+00:00"):
        assert contracts.record_deadline_miss(root, contracts.DeadlineMiss(
            model="m", dag_id="nightly_retrain__m", run_id=run, deadline_time=f"{run[11:21]}T06:00:05+00:00",
            queued_at=f"{run[11:21]}T02:00:05+00:00", interval_s=14400, run_state="running"))
    # the callback may run twice for one run: it is recorded once
    assert not contracts.record_deadline_miss(root, contracts.DeadlineMiss(
        model="m", dag_id="nightly_retrain__m", run_id="scheduled__2026-12-02T02:00:00+00:00",
        deadline_time="x", queued_at=None, interval_s=14400))

    class NoRegistry:
        def search_registered_models(self):
            return []

    cfg = _config(tmp_path, "models:\n  - {name: m}\n")
    (m,) = data.build_overview(root, NoRegistry(), configured=cfg)["models"]
    assert [d["run_id"][11:21] for d in m["deadline_misses"]] == ["2026-12-02", "2026-12-01"]
    assert m["deadline_misses"][0]["text"] == ("DEADLINE MISSED: not done by 2026-12-02T06:00:05+00:00 "
                                               "(4h after it was queued at 2026-12-02T02:00:05+00:00)")


def test_the_page_shows_config_errors_unregistered_models_and_deadline_misses(world_env, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from nightshift.ui import app as ui_app

    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - {{name: {MODEL}, default: true}}\n  - {{name: fresh-model, deploy: {{port: 8611}}}}\n"
                 "  - {name: broken, recipe: {epochs: 0}, deploy: {port: 8612}}\n")
    monkeypatch.setenv("NIGHTSHIFT_MODELS_FILE", str(f))
    root = tmp_path / "artifacts"  # not the shared world's: the other tests count its models
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(root))
    contracts.record_deadline_miss(root, contracts.DeadlineMiss(
        model="fresh-model", dag_id="nightly_retrain__fresh-model", run_id="manual__late", deadline_time="2026-12-02T06:00:00+00:00",
        queued_at="2026-12-02T02:00:00+00:00", interval_s=14400, run_state="running"))
    application = ui_app.create_app()
    from airflow.api_fastapi.core_api.security import get_user

    application.dependency_overrides[get_user] = lambda: type("U", (), {"get_name": lambda self: "alice"})()
    monkeypatch.setattr(ui_app, "_check_user", lambda user: user)
    html = TestClient(application).get("/").text
    assert 'id="model-fresh-model"' in html and "nightly_retrain__fresh-model" in html
    assert "model &#39;broken&#39;, field &#39;recipe.epochs&#39;" in html or "model 'broken', field 'recipe.epochs'" in html
    assert "DEADLINE MISSED: not done by 2026-12-02T06:00:00+00:00" in html and "manual__late" in html
