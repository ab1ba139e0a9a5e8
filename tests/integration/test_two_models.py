"""Two models from one models file, end to end: real Airflow metadata DB, MLflow (SQLite),
Docker daemon and ONNX Runtime, on the bundled digits for both.

The models file lists ``two-a`` (the default model: Dags ``nightly_retrain`` / ``drift_monitor``,
its own gate file relative to the models file) and ``two-b`` (``nightly_retrain__two-b`` /
``drift_monitor__two-b``), each with its own serving port. Each nightly Dag runs with **no conf**:
what it trains, registers, builds and deploys comes from its entry's Params. They keep separate
champions, images, serving ports and drift timelines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import free_deploy_port, remove_images, run_dag as run

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("two-a", "two-b")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh MLflow store and artifact root, and a models file with two models on free ports."""
    home = tmp_path_factory.mktemp("two-models")
    saved = dict(os.environ)
    policy = (ROOT / "include" / "gates.yaml").read_text()
    assert "min_accuracy: 0.9" in policy
    (home / "gates-a.yaml").write_text(policy.replace("min_accuracy: 0.9", "min_accuracy: 0.8"))
    ports = {m: free_deploy_port() for m in MODELS}
    (home / "models.yaml").write_text(
        "models:\n"
        f"  - {{name: two-a, default: true, source: bundled, recipe: {{epochs: 6}}, gates: gates-a.yaml,\n"
        f"     deploy: {{target: docker, port: {ports['two-a']}}}}}\n"
        f"  - {{name: two-b, source: bundled, recipe: {{epochs: 5, model: small_cnn}},\n"
        f"     deploy: {{target: docker, port: {ports['two-b']}}}}}\n")
    os.environ.update({
        "NIGHTSHIFT_MODELS_FILE": str(home / "models.yaml"),
        # two-b has no gate file of its own: the deployment's
        "NIGHTSHIFT_GATES_FILE": str(home / "gates-a.yaml"),
        "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
    })
    yield {"home": home, "ports": ports}
    try:
        _undeploy(home)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for m in MODELS:
            remove_images(f"nightshift/{m}")


def _undeploy(home) -> None:
    import docker

    from nightshift.deploy import LocalDeployer

    client = docker.from_env()
    for m in MODELS:
        LocalDeployer(client, model_name=m, artifact_root=home / "artifacts").undeploy()



@pytest.fixture(scope="module")
def dags(env):
    from airflow.dag_processing.dagbag import DagBag

    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite") and not db.exists():
        pytest.fail(f"Airflow metadata DB {db} does not exist: run `make setup` (or `make test`) first")
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


@pytest.fixture(scope="module")
def runs(dags, env):
    return {m: run(dags[dag_id], {}) for m, dag_id in zip(MODELS, ("nightly_retrain", "nightly_retrain__two-b"))}


def test_each_model_promotes_and_deploys_its_own_champion_on_its_own_port(runs, env):
    import requests

    from nightshift import registry, state

    c = registry.client(os.environ["MLFLOW_TRACKING_URI"])
    champions = {}
    for m in MODELS:
        dr, states = runs[m]
        assert str(dr.state) == "success", (m, states)
        assert states.pop("approve_promotion") == "skipped" and set(states.values()) == {"success"}, (m, states)
        champions[m] = registry.get_champion(c, m)
        assert champions[m] is not None and champions[m]["version"] == "1", m  # each its own first version
    image = {m: champions[m]["tags"]["nightshift.image"] for m in MODELS}
    assert image["two-a"].startswith("nightshift/two-a:") and image["two-b"].startswith("nightshift/two-b:")
    assert champions["two-a"]["tags"]["nightshift.dag_run"] == runs["two-a"][0].run_id
    assert champions["two-b"]["tags"]["nightshift.dag_run"] == runs["two-b"][0].run_id
    for m in MODELS:
        deployed = state.read_deployment(env["home"] / "artifacts", m)
        assert deployed and deployed["registry_version"] == "1" and deployed["image"] == image[m], (m, deployed)
        assert deployed["url"] == f"http://127.0.0.1:{env['ports'][m]}" and deployed["model"] == m, (m, deployed)
        ready = requests.get(f"http://127.0.0.1:{env['ports'][m]}/v2/health/ready", timeout=10)
        assert ready.status_code == 200, (m, ready.text)
        meta = requests.get(f"http://127.0.0.1:{env['ports'][m]}/v2/models/{m}", timeout=10)
        assert meta.status_code == 200, (m, meta.status_code, meta.text)  # the port serves this model


def test_runs_leave_their_folders_under_their_own_dag(runs, env):
    from nightshift.artifacts import run_dir

    assert (run_dir(env["home"] / "artifacts", "nightly_retrain", runs["two-a"][0].run_id) / "promotion.json").is_file()
    assert (run_dir(env["home"] / "artifacts", "nightly_retrain__two-b", runs["two-b"][0].run_id)
            / "promotion.json").is_file()


def test_each_drift_monitor_writes_its_own_models_timeline(runs, dags, env):
    from nightshift import state
    for m, dag_id in zip(MODELS, ("drift_monitor", "drift_monitor__two-b")):
        dr, states = run(dags[dag_id], {})
        assert str(dr.state) == "success" and states["check_served_drift"] == "success", (m, states)
    for m, dag_id in zip(MODELS, ("drift_monitor", "drift_monitor__two-b")):
        (point,) = state.read_drift_timeline(env["home"] / "artifacts", m)
        assert point["dag_id"] == dag_id and point["champion_version"] == "1", (m, point)


def test_the_view_lists_both_models_from_the_file(runs, env):
    from nightshift import model_config, registry
    from nightshift.ui import data

    o = data.build_overview(env["home"] / "artifacts", registry.client(os.environ["MLFLOW_TRACKING_URI"]),
                            configured=model_config.load_models())
    shown = {m["name"]: m for m in o["models"]}
    assert list(shown)[:2] == list(MODELS)
    for m in MODELS:
        assert shown[m]["champion"] == "1" and shown[m]["config"]["deploy_port"] == env["ports"][m]
        assert shown[m]["deployment"]["registry_version"] == "1"
