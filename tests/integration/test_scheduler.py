"""nightly_retrain under the real scheduler, as ``make airflow-ui`` runs it.

``airflow standalone`` (API server, scheduler with the LocalExecutor, DAG
processor, triggerer) on a temporary ``AIRFLOW_HOME`` with its own SQLite
metadata DB, MLflow store and artifact root; the run is triggered and read
through the REST API (``/api/v2``, a token from SimpleAuthManager's
``/auth/token``), on an ImageFolder of JPEG files. Unlike ``dag.test()``, each
task runs in a task process started by the executor and supervised by the Task
SDK, whose main module is the ``airflow`` entry point and whose metadata-DB
access is blocked: the decode workers of ``collect_data`` must start without
re-running that main (they did, and the pool broke).

The scheduler's own timetable is off (``[scheduler] use_job_schedule``), so
unpausing the DAG starts no scheduled run with the default params: only the
run this test triggers runs.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.airflow_stack import ROOT, AirflowStack
from tests.integration.conftest import remove_images

pytestmark = [pytest.mark.integration, pytest.mark.docker]

DAG_ID = "nightly_retrain"
MODEL = "sched-digits"
CLASSES = ("0", "1", "2")
PER_CLASS = 170
#: the whole run (collect ... deploy) after the stack is up, seconds
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """3 classes × 170 real digits, upscaled to 16×16 RGB and saved as JPEG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("photos")
    d = load_digits()
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in np.flatnonzero(d.target == int(cls))[:PER_CLASS]:
            g = np.kron(np.clip(d.images[i] * 16, 0, 255).astype(np.uint8), np.ones((2, 2), np.uint8))
            Image.fromarray(np.stack([g, g, g], axis=2)).save(root / cls / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A fresh Airflow (SQLite, LocalExecutor), MLflow store and artifact root under one temporary
    home, and the project's gate file with a floor and a minimum test split these digits reach
    (as run Params, looser values would make the promotion wait for a person)."""
    import yaml

    home = tmp_path_factory.mktemp("scheduler")
    gates = yaml.safe_load((ROOT / "include" / "gates.yaml").read_text())
    assert gates["thresholds"]["min_accuracy"] >= 0.8
    gates["thresholds"]["min_accuracy"] = 0.8
    gates["thresholds"]["min_test_images"] = 30  # 510 photos leave about 51 test images
    (home / "gates.yaml").write_text(yaml.safe_dump(gates))
    s = AirflowStack(home, DAG_ID, NIGHTSHIFT_GATES_FILE=str(home / "gates.yaml"),
                     NIGHTSHIFT_COLLECT_WORKERS="2")  # decode in worker processes even on a one-CPU machine
    try:
        s.start()
        s.load_pools()
        yield s
    finally:
        s.stop()
        remove_images(f"nightshift/{MODEL}")



def test_nightly_retrain_triggered_through_the_rest_api_runs_under_the_scheduler(stack, photos):
    t0 = time.monotonic()
    stack.unpause()
    conf = {"source": str(photos), "image_shape": [16, 16, 3], "epochs": 8, "model_name": MODEL,
            "deploy_target": "none"}
    run_id = stack.trigger(conf)

    state, deadline = None, time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        if state in ("success", "failed"):
            break
        time.sleep(3)
    tis = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    states = {ti["task_id"]: ti["state"] for ti in tis}
    elapsed = time.monotonic() - t0
    print(f"{DAG_ID} {run_id}: {state} in {elapsed:.0f}s under the scheduler (task seconds: "
          f"{ {ti['task_id']: round(ti['duration'] or 0, 1) for ti in tis} })")
    assert state == "success", f"run {run_id} ended {state!r} after {elapsed:.0f}s: {states}\n{stack.logs(run_id, states)}"
    # require_approval is off and the gates are the file's: nobody is asked; deploy_target is none
    tasks = [t["task_id"] for t in stack.api("GET", f"/dags/{DAG_ID}/tasks").json()["tasks"]]
    expected = {t: "success" for t in tasks} | {"approve_promotion": "skipped", "deploy": "skipped"}
    assert states == expected, f"{states}\n{stack.logs(run_id, states)}"

    note, deadline = None, time.monotonic() + 30  # the listener, in the scheduler, writes the run note
    while not note and time.monotonic() < deadline:
        note = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json().get("note")
        time.sleep(1)
    assert note and note.startswith(f"[nightshift] PROMOTED {MODEL} v1 to champion"), \
        f"note: {note!r}\n{stack.logs(run_id, states)}"
    collected = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/collect_data/xcomEntries/"
                                 "return_value", params={"deserialize": True}).json()["value"]
    collected = json.loads(collected) if isinstance(collected, str) else collected
    # every JPEG went through the decode worker processes
    assert collected["incremental"]["decoded"] == len(CLASSES) * PER_CLASS, collected
    assert collected["undecodable"] == 0, collected
