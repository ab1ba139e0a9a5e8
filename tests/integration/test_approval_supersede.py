"""A run waiting for approval holds back no newer run, and a newer candidate ends its
wait (issue 19 item 2), under the real scheduler and triggerer.

``airflow standalone`` (API server, scheduler with the LocalExecutor, DAG
processor, triggerer) on a temporary home runs a small DAG with the real
approval tasks of ``nightly_retrain`` (``approve_promotion`` and
``finalize_promotion``, ``max_active_runs`` as nightly_retrain's) after a
``promote`` that registers a real MLflow model version waiting for approval.
Run A waits; run B is triggered, starts at once and registers a newer
candidate; A's wait ends as ``superseded`` (champion untouched); B's request is
answered Approve through the REST API, as the UI does, and B promotes.
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

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "approval_supersede"
MODEL = "supersede-model"
STARTUP_TIMEOUT_S = 240
STEP_TIMEOUT_S = 180

DAG_FILE = '''
from datetime import datetime

from airflow.sdk import dag, task

from nightshift.operators import FinalizePromotionOperator, PromotionApprovalOperator

MAX_ACTIVE_RUNS = {max_active_runs}  # nightly_retrain's


@dag(dag_id="{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=MAX_ACTIVE_RUNS, render_template_as_native_obj=True, default_args={{"retries": 0}},
     params={{"model_name": "{model}"}})
def approval_supersede():
    @task
    def promote(**context):
        """A candidate the gates blessed, registered waiting for approval (as promote does)."""
        import tempfile
        from pathlib import Path

        from nightshift import registry
        from nightshift.gates import Decision
        from nightshift.settings import Settings

        s = Settings.from_env()
        c = registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri)
        src = Path(tempfile.mkdtemp())
        (src / "model.onnx").write_text(context["run_id"])
        with registry.training_run(c, "supersede", context["run_id"], tags={{}}, params={{}},
                                   artifact_location=(Path(s.artifact_root) / "mlruns").as_uri()) as run_id:
            registry.log_artifacts(c, run_id, src, "onnx")
        base = registry.get_champion(c, "{model}")
        d = Decision("BLESSED", "every gate passed", base["version"] if base else None)
        out = registry.register_candidate(c, "{model}", run_id, artifact_path="onnx",
                                          tags={{"onnx_sha256": run_id}}, decision=d, require_approval=True)
        return out

    p = promote()
    approve = PromotionApprovalOperator(task_id="approve_promotion", promotion=p,
                                        model_name="{{{{ params.model_name }}}}", poke_interval=1.0,
                                        supersede_interval=2.0)
    final = FinalizePromotionOperator(task_id="finalize_promotion", promotion=p, approval=approve.output,
                                      model_name="{{{{ params.model_name }}}}")
    approve >> final


approval_supersede()
'''


class Stack:
    """``airflow standalone`` in a process group of its own, its log in a file."""

    def __init__(self, home: Path, env: dict[str, str], port: int) -> None:
        self.home, self.env = home, env
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = home / "standalone.log"
        self.proc: subprocess.Popen | None = None
        self._token: str | None = None

    def start(self) -> None:
        out = subprocess.run(["airflow", "db", "migrate"], env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["airflow", "standalone"], env=self.env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
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

    def token(self) -> str:
        import requests

        if self._token is None:
            r = requests.get(f"{self.base}/auth/token", timeout=10)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs):
        import requests

        return requests.request(method, f"{self.base}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)

    def logs(self, tail: int = 8000) -> str:
        parts = [f"===== {self.log_path} =====\n{self.log_path.read_text(errors='replace')[-tail:]}"]
        for f in sorted((self.home / "airflow" / "logs").glob(f"dag_id={DAG_ID}/**/*.log")):
            parts.append(f"===== {f} =====\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait_until_ready(self) -> None:
        import requests

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"airflow standalone exited ({self.proc.returncode})\n{self.logs()}"
            try:
                if self.api("GET", f"/dags/{DAG_ID}").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        pytest.fail(f"the Airflow stack was not ready within {STARTUP_TIMEOUT_S}s\n{self.logs()}")

    def trigger(self) -> str:
        r = self.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None})
        assert r.status_code in (200, 201), r.text
        return r.json()["dag_run_id"]

    def tis(self, run_id: str) -> dict[str, dict]:
        r = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        assert r.status_code == 200, r.text
        return {ti["task_id"]: ti for ti in r.json()["task_instances"]}

    def wait_for(self, what: str, check, timeout: float = STEP_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            time.sleep(1)
        pytest.fail(f"timed out waiting for {what}\n{self.logs()}")

    def state(self, run_id: str, task_id: str) -> str | None:
        return (self.tis(run_id).get(task_id) or {}).get("state")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("supersede")
    dags = home / "dags"
    dags.mkdir()
    from nightly_retrain import MAX_ACTIVE_RUNS

    (dags / f"{DAG_ID}.py").write_text(DAG_FILE.format(dag_id=DAG_ID, model=MODEL, max_active_runs=MAX_ACTIVE_RUNS))
    port = free_port()
    env = {
        **os.environ,
        "NIGHTSHIFT_HOME": str(home),
        "NIGHTSHIFT_ARTIFACT_ROOT": str(home / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    (home / "airflow").mkdir()
    s = Stack(home, env, port)
    s.start()
    try:
        s.wait_until_ready()
        r = s.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
        assert r.status_code == 200, r.text
        yield s
    finally:
        s.stop()


def test_a_waiting_run_holds_back_no_newer_run_and_is_superseded_by_it(stack):
    from nightshift import contracts, registry

    run_a = stack.trigger()
    stack.wait_for("run A's approve_promotion to wait (deferred on the supersedable trigger)",
                   lambda: stack.state(run_a, "approve_promotion") == "deferred")
    # a newer run starts and registers its candidate while A still waits
    run_b = stack.trigger()
    stack.wait_for("run B's promote", lambda: stack.state(run_b, "promote") == "success")
    b_promoted_at = stack.tis(run_b)["promote"]["end_date"]
    # A's wait ends: superseded by B's candidate, recorded, nothing promoted
    stack.wait_for("run A to end", lambda: stack.state(run_a, "finalize_promotion") in ("success", "failed"))
    a = stack.tis(run_a)
    assert a["approve_promotion"]["state"] == "success" and a["finalize_promotion"]["state"] == "success", a
    assert a["approve_promotion"]["end_date"] > b_promoted_at  # A still waited when B had promoted

    c = registry.client(stack.env["MLFLOW_TRACKING_URI"])
    history = list(contracts.read_jsonl(contracts.history_path(stack.env["NIGHTSHIFT_ARTIFACT_ROOT"], MODEL)))
    (superseded,) = history
    assert superseded["action"] == "superseded" and superseded["run_id"] == run_a
    version_a, version_b = superseded["version"], superseded["extra"]["superseded_by"]
    assert int(version_b) > int(version_a)
    assert registry.get_champion(c, MODEL) is None
    tags = c.get_model_version(MODEL, version_a).tags
    assert tags["nightshift.approval"] == "superseded" and tags["nightshift.superseded_by"] == version_b
    # A's request is closed in Airflow, saying why (the Required Actions page no longer offers it)
    r = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_a}/taskInstances/approve_promotion/-1/hitlDetails")
    assert r.status_code == 200, r.text
    detail = r.json()
    assert detail["response_received"] and detail["chosen_options"] == ["Reject"]
    assert f"superseded by the newer candidate v{version_b}" in json.dumps(detail["params_input"])

    # B waits for its own answer; a person approves it through the REST API, as the UI does
    stack.wait_for("run B's approve_promotion to wait", lambda: stack.state(run_b, "approve_promotion") == "deferred")
    r = stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_b}/taskInstances/approve_promotion/-1/hitlDetails",
                  json={"chosen_options": ["Approve"], "params_input": {"comment": "newest one, ship it"}})
    assert r.status_code == 200, r.text
    stack.wait_for("run B to end", lambda: stack.state(run_b, "finalize_promotion") in ("success", "failed"))
    assert stack.state(run_b, "finalize_promotion") == "success", stack.logs()
    assert registry.get_champion(c, MODEL)["version"] == version_b
    history = list(contracts.read_jsonl(contracts.history_path(stack.env["NIGHTSHIFT_ARTIFACT_ROOT"], MODEL)))
    assert [e["action"] for e in history] == ["superseded", "promoted"] and history[-1]["run_id"] == run_b
