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
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "nightly_retrain"
MODEL = "sched-digits"
CLASSES = ("0", "1", "2")
PER_CLASS = 170
#: the whole run (collect ... deploy) after the stack is up, seconds
RUN_TIMEOUT_S = 600
STARTUP_TIMEOUT_S = 180


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


class Stack:
    """``airflow standalone`` in a process group of its own, with its log in a file."""

    def __init__(self, home: Path, env: dict[str, str], port: int) -> None:
        self.home, self.env, self.port = home, env, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = home / "standalone.log"
        self.proc: subprocess.Popen | None = None
        self._token: str | None = None

    def start(self) -> None:
        """``make airflow-ui``'s command (it creates the metadata DB's tables first)."""
        with open(self.log_path, "wb") as log:
            # a session of its own: teardown can end the components and task processes it started
            self.proc = subprocess.Popen(["airflow", "standalone"], env=self.env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """SIGINT to standalone (it stops its components), then the rest of its process group."""
        if self.proc is None or self.proc.poll() is not None and not self._group_alive():
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if not self._group_alive():
                break
            os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + grace
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def _group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    # ---- the REST API
    def token(self) -> str:
        import requests

        if self._token is None:
            r = requests.get(f"{self.base}/auth/token", timeout=10)  # all users are admins here
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs):
        import requests

        return requests.request(method, f"{self.base}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)

    def wait_until_ready(self) -> None:
        """The API answers and the DAG processor has serialised the DAG."""
        import requests

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"airflow standalone exited ({self.proc.returncode})\n{self.logs()}"
            try:
                if self.api("GET", f"/dags/{DAG_ID}").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        pytest.fail(f"the Airflow stack was not ready within {STARTUP_TIMEOUT_S}s\n{self.logs()}")

    def load_pools(self) -> None:
        """The pools of airflow_settings.yaml (train_gpu runs in ``nightshift_gpu``), as `make setup` loads them."""
        import yaml

        for p in yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]["pools"]:
            r = self.api("POST", "/pools", json={"name": p["pool_name"], "slots": int(p["pool_slot"]),
                                                 "description": p.get("pool_description", "")})
            assert r.status_code in (200, 201), r.text

    def logs(self, dag_run_id: str | None = None, states: dict[str, str] | None = None, tail: int = 12_000) -> str:
        """The components' log and the logs of a run's tasks that did not succeed (their tails),
        for an assertion message."""
        parts = [f"===== {self.log_path} =====\n" + _tail(self.log_path, tail)]
        if dag_run_id:
            for f in sorted((self.home / "airflow" / "logs").glob(f"dag_id={DAG_ID}/run_id={dag_run_id}/**/*.log")):
                task = next((p.split("=", 1)[1] for p in f.parts if p.startswith("task_id=")), None)
                if states is None or states.get(task) not in ("success", "skipped"):
                    parts.append(f"===== {f} =====\n" + _tail(f, 4000))
        return "\n".join(parts)


def _tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"({exc})"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A fresh Airflow (SQLite, LocalExecutor), MLflow store and artifact root, all under one
    temporary home; the project's gate file with a floor and a minimum test split these digits
    reach (as run Params, looser values would make the promotion wait for a person)."""
    import yaml

    home = tmp_path_factory.mktemp("scheduler")
    gates = yaml.safe_load((ROOT / "include" / "gates.yaml").read_text())
    assert gates["thresholds"]["min_accuracy"] >= 0.8
    gates["thresholds"]["min_accuracy"] = 0.8
    gates["thresholds"]["min_test_images"] = 25  # 510 photos leave about 51 test images
    if "min_test_images" in gates["thresholds"]:  # these 510 images give ~50 test images
        gates["thresholds"]["min_test_images"] = 30
    (home / "gates.yaml").write_text(yaml.safe_dump(gates))
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "NIGHTSHIFT_HOME": str(home),
        "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "NIGHTSHIFT_GATES_FILE": str(home / "gates.yaml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        # task processes reach the API server here (the default assumes port 8080)
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only triggered runs: no 02:00 run on unpause
        "NIGHTSHIFT_COLLECT_WORKERS": "2",  # decode in worker processes even on a one-CPU machine
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
    }
    (home / "airflow").mkdir()
    s = Stack(home, env, port)
    try:
        s.start()
        s.wait_until_ready()
        s.load_pools()
        yield s
    finally:
        s.stop()
        _remove_images(f"nightshift/{MODEL}")


def _remove_images(repository: str) -> None:
    """The images the run built (their layers are shared; tags would pile up), and any container
    of theirs a run stopped half-way left behind."""
    import docker

    client = docker.from_env()
    for image in client.images.list(name=repository):
        for container in client.containers.list(all=True, filters={"ancestor": image.id}):
            container.remove(force=True)
        client.images.remove(image.id, force=True)
    client.close()


def test_nightly_retrain_triggered_through_the_rest_api_runs_under_the_scheduler(stack, photos):
    t0 = time.monotonic()
    r = stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    assert r.status_code == 200, r.text
    conf = {"source": str(photos), "image_shape": [16, 16, 3], "epochs": 8, "model_name": MODEL,
            "deploy_target": "none"}
    r = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]

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
