"""A real Airflow for the tests that must not use ``dag.test()``: ``airflow standalone``
(API server, scheduler with the LocalExecutor, DAG processor, triggerer), as ``make
airflow-ui`` runs it, on a temporary home with its own SQLite metadata DB, MLflow store
and artifact root, driven through the REST API (``/api/v2``, a token from
SimpleAuthManager's ``/auth/token``, all users admins).

The scheduler's own timetable is off (``[scheduler] use_job_schedule``), so unpausing a
DAG starts no scheduled run with the default params: only the runs a test triggers run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240


def stack_env(home: Path, *, port: int, dags_folder: Path = ROOT / "dags", **extra: str) -> dict[str, str]:
    """The environment of every component: the project's plugins, this home's state."""
    return {
        **os.environ,
        "NIGHTSHIFT_HOME": str(home),
        "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
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
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **extra,
    }


class AirflowStack:
    """``airflow standalone`` in a process group of its own, its log in a file.

    :param home: the temporary home (``airflow/``, ``artifacts/``, ``mlflow.db`` inside).
    :param dag_id: the DAG the test drives (readiness waits until it is serialised).
    """

    def __init__(self, home: Path, dag_id: str, *, dags_folder: Path = ROOT / "dags", **extra_env: str) -> None:
        self.home, self.dag_id = home, dag_id
        self.port = free_port()
        self.env = stack_env(home, port=self.port, dags_folder=dags_folder, **extra_env)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "standalone.log"
        self.proc: subprocess.Popen | None = None
        self._token: str | None = None

    # ---- lifecycle
    def start(self) -> "AirflowStack":
        """Start ``make airflow-ui``'s command and wait until the API serves the DAG."""
        (self.home / "airflow").mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # a session of its own: stop() ends the components and task processes it started
            self.proc = subprocess.Popen(["airflow", "standalone"], env=self.env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_ready()
        return self

    def stop(self) -> None:
        """SIGINT to standalone (it stops its components), then the rest of its process group."""
        if self.proc is None:
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

    def _wait_until_ready(self) -> None:
        import requests

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"airflow standalone exited ({self.proc.returncode})\n{self.logs()}"
            try:
                if self.api("GET", f"/dags/{self.dag_id}").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        pytest.fail(f"the Airflow stack was not ready within {STARTUP_TIMEOUT_S}s\n{self.logs()}")

    # ---- the REST API
    def token(self) -> str:
        import requests

        if self._token is None:
            r = requests.get(f"{self.base}/auth/token", timeout=10)  # all users are admins here
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any):
        import requests

        return requests.request(method, f"{self.base}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)

    def load_pools(self) -> None:
        """The pools of airflow_settings.yaml (train_gpu runs in ``nightshift_gpu``), as `make setup` loads them."""
        import yaml

        for p in yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]["pools"]:
            r = self.api("POST", "/pools", json={"name": p["pool_name"], "slots": int(p["pool_slot"]),
                                                 "description": p.get("pool_description", "")})
            assert r.status_code in (200, 201), r.text

    def unpause(self) -> None:
        r = self.api("PATCH", f"/dags/{self.dag_id}", json={"is_paused": False})
        assert r.status_code == 200, r.text

    def trigger(self, conf: dict[str, Any] | None = None) -> str:
        r = self.api("POST", f"/dags/{self.dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert r.status_code in (200, 201), r.text
        return r.json()["dag_run_id"]

    def run_state(self, run_id: str) -> str | None:
        return self.api("GET", f"/dags/{self.dag_id}/dagRuns/{run_id}").json().get("state")

    def tis(self, run_id: str) -> dict[str, dict[str, Any]]:
        r = self.api("GET", f"/dags/{self.dag_id}/dagRuns/{run_id}/taskInstances")
        assert r.status_code == 200, r.text
        return {ti["task_id"]: ti for ti in r.json()["task_instances"]}

    def state(self, run_id: str, task_id: str) -> str | None:
        return (self.tis(run_id).get(task_id) or {}).get("state")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 180, every: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            time.sleep(every)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    # ---- evidence for assertion messages
    def logs(self, run_id: str | None = None, states: dict[str, str] | None = None, tail: int = 12_000) -> str:
        """The components' log and the tails of the task logs (of one run's tasks that did not
        succeed, when ``run_id`` and ``states`` are given)."""
        parts = [f"===== {self.log_path} =====\n" + _tail(self.log_path, tail)]
        pattern = f"dag_id={self.dag_id}/run_id={run_id}/**/*.log" if run_id else f"dag_id={self.dag_id}/**/*.log"
        for f in sorted((self.home / "airflow" / "logs").glob(pattern)):
            task = next((p.split("=", 1)[1] for p in f.parts if p.startswith("task_id=")), None)
            if states is None or states.get(task) not in ("success", "skipped"):
                parts.append(f"===== {f} =====\n" + _tail(f, 4000))
        return "\n".join(parts)


def _tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"({exc})"
