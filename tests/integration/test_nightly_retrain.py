"""nightly_retrain end to end: real Airflow metadata DB, MLflow (SQLite), Docker
daemon and ONNX Runtime, on an ImageFolder of JPEG photos of handwritten digits.

Runs in order, all on the same folder: first promotion; then an impossible
accuracy floor (champion unchanged, reason recorded); then a truncated JPEG
and a text file named .jpg are added to the folder (the decodable pixels are
unchanged) and the run fails at validation naming both, trains nothing, and
leaves the champion alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.conftest import free_deploy_port, remove_images, run_dag as run

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "it-digits"
PER_CLASS = 60


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """10 classes × 60 real digits, upscaled to 24×24 RGB and saved as JPEG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("photos")
    d = load_digits()
    for k in range(10):
        for i in np.flatnonzero(d.target == k)[:PER_CLASS]:
            g = np.kron(np.clip(d.images[i] * 16, 0, 255).astype(np.uint8), np.ones((3, 3), np.uint8))
            (root / str(k)).mkdir(exist_ok=True)
            Image.fromarray(np.stack([g, g, g], axis=2)).save(root / str(k) / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def conf(photos):
    return {"epochs": 8, "model_name": MODEL, "source": str(photos), "image_shape": [8, 8, 1],
            "deploy_port": free_deploy_port()}



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh MLflow store and artifact root for this module (Airflow's DB is the project's)."""
    home = tmp_path_factory.mktemp("nightshift")
    saved = dict(os.environ)
    # the project's gate file with a floor these 8x8 digits reach in 8 epochs; a looser floor as a
    # run Param would (rightly) make the promotion wait for a person's approval
    gates = home / "gates.yaml"
    policy = (ROOT / "include" / "gates.yaml").read_text()
    assert "min_accuracy: 0.9" in policy
    # 600 photos leave about 60 test images: the production minimum (200) would (rightly) refuse them
    assert "min_test_images: 200" in policy
    gates.write_text(policy.replace("min_accuracy: 0.9", "min_accuracy: 0.8")
                     .replace("min_test_images: 200", "min_test_images: 30"))
    os.environ.update({
        "NIGHTSHIFT_GATES_FILE": str(gates),
        "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
    })
    yield home
    _undeploy(home)
    os.environ.clear()
    os.environ.update(saved)
    remove_images(f"nightshift/{MODEL}")


def _undeploy(home) -> None:
    import docker

    from nightshift.deploy import LocalDeployer

    LocalDeployer(docker.from_env(), model_name=MODEL, artifact_root=home / "artifacts").undeploy()



@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite") and not db.exists():
        pytest.fail(f"Airflow metadata DB {db} does not exist: run `make setup` (or `make test`) first")

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag.dags["nightly_retrain"]


@pytest.fixture(scope="module")
def mlflow(env):
    from nightshift import registry

    return registry.client(os.environ["MLFLOW_TRACKING_URI"])



def promotion(env, run_id) -> dict:
    from nightshift.artifacts import run_dir

    return json.loads((run_dir(env / "artifacts", "nightly_retrain", run_id) / "promotion.json").read_text())


@pytest.fixture(scope="module")
def first_run(dag, env, mlflow, conf):
    return run(dag, conf)


def test_first_run_promotes_and_deploys_a_champion(first_run, env, mlflow, conf):
    from nightshift import registry

    dr, states = first_run
    assert str(dr.state) == "success", states
    assert states.pop("approve_promotion") == "skipped", states  # require_approval is off by default
    assert set(states.values()) == {"success"} and len(states) == 11, states
    p = promotion(env, dr.run_id)
    assert p["promoted"] is True and p["decision"] == "BLESSED", p["reason"]
    champion = registry.get_champion(mlflow, MODEL)
    assert champion is not None and champion["version"] == p["version"]
    tags = champion["tags"]
    assert float(tags["nightshift.offline_accuracy"]) >= 0.8
    assert tags["nightshift.image"].startswith(f"nightshift/{MODEL}:")
    assert json.loads(tags["gate.serving_errors"])["observed"] == 0
    assert p["drift"]["status"] == "no_reference"
    import requests

    served = requests.get(f"http://127.0.0.1:{conf['deploy_port']}/v2/models/{MODEL}", timeout=10)
    assert served.status_code == 200  # the champion serves on the stable port
    assert tags["nightshift.onnx_sha256"][:12] in served.json()["versions"]


def test_impossible_floor_keeps_champion_and_records_why(first_run, dag, env, mlflow, conf):
    from nightshift import registry

    before = registry.get_champion(mlflow, MODEL)["version"]
    dr, states = run(dag, {**conf, "max_p95_latency_ms": 0.001})  # no server answers in a microsecond
    assert str(dr.state) == "success" and states["deploy"] == "skipped", states  # not promoted: not deployed
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    import time

    note, deadline = None, time.monotonic() + 15
    while note is None and time.monotonic() < deadline:  # the run says so where a person looks
        with create_session() as session:
            note = session.query(DagRun).filter(DagRun.run_id == dr.run_id).one().note
        time.sleep(0.5)
    assert note and note.startswith("[nightshift] NOT PROMOTED") and "p95_latency" in note
    assert set(states.values()) == {"success", "skipped"}, states
    p = promotion(env, dr.run_id)
    assert p["promoted"] is False and p["decision"] == "NOT_BLESSED"
    assert "p95_latency failed" in p["reason"] and "0.001 ms" in p["reason"]
    assert p["threshold_origin"]["max_p95_latency_ms"] == "param"
    assert p["threshold_origin"]["champion_relative_tolerance"].startswith("file")
    assert registry.get_champion(mlflow, MODEL)["version"] == before
    mv = mlflow.get_model_version(MODEL, p["version"])
    assert mv.tags["nightshift.decision"] == "NOT_BLESSED"
    assert json.loads(mv.tags["gate.p95_latency"])["passed"] is False
    vs = json.loads(mv.tags["gate.vs_champion"])  # the champion was re-scored on this run's test split
    assert vs["observed"]["champion"] is not None and vs["observed"]["candidate"] is not None
    aliases = mlflow.get_registered_model(MODEL).aliases
    assert str(aliases["challenger"]) == p["version"] and str(aliases["champion"]) == before
    assert p["drift"]["status"] == "ok"  # the champion's training data is now the reference


def test_corrupt_files_added_to_the_same_folder_fail_validation_and_train_nothing(first_run, dag, env, mlflow,
                                                                                 conf, photos):
    from nightshift import registry
    from nightshift.artifacts import run_dir

    champion_before = registry.get_champion(mlflow, MODEL)["version"]
    good = sorted((photos / "3").glob("*.jpg"))[0].read_bytes()
    (photos / "3" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "7" / "readme.jpg").write_text("not a photo, just a text file named .jpg")
    exp = mlflow.get_experiment_by_name(MODEL)
    runs_before = len(mlflow.search_runs([exp.experiment_id]))
    try:
        dr, states = run(dag, conf)
    finally:
        (photos / "3" / "truncated.jpg").unlink()
        (photos / "7" / "readme.jpg").unlink()
    assert str(dr.state) == "failed"
    assert states["collect_data"] == "success"
    assert states["validate_data"] == "failed"
    for task in ("train_gpu", "export_onnx", "build_inference_image", "system_eval", "promote", "approve_promotion",
                 "finalize_promotion", "deploy"):
        assert states[task] == "upstream_failed", states
    assert len(mlflow.search_runs([exp.experiment_id])) == runs_before  # nothing trained
    assert registry.get_champion(mlflow, MODEL)["version"] == champion_before
    report = (run_dir(env / "artifacts", "nightly_retrain", dr.run_id) / "validation" / "validation.json").read_text()
    assert "3/truncated.jpg" in report and "7/readme.jpg" in report
