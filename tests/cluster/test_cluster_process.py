"""The cluster profile's process handling, without starting a server: ``scripts/cluster/supervise.py``
(restart on failure, never after a clean exit or a stop, a start-up failure reported at once, signals
forwarded) and the settings ``cluster.py up`` records for a later ``restart`` from another shell."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


SUPERVISE = Path(__file__).resolve().parents[2] / "scripts" / "cluster" / "supervise.py"


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text("import sys, time, signal, pathlib\nruns = pathlib.Path(sys.argv[1])\n"
                      "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n" + body)
    return [sys.executable, str(script), str(tmp_path / "runs")]


def _supervise(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUPERVISE), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_a_child_that_fails_after_start_up_is_started_again_until_it_exits_cleanly(tmp_path):
    # fails on its first two runs, exits 0 on the third
    child = _child(tmp_path, "sys.exit(3 if len(runs.read_text()) < 3 else 0)\n")
    r = _supervise("--name", "sched", "--startup-s", "0", "--", *child)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "runs").read_text() == "xxx"
    restarts = [line for line in r.stdout.splitlines() if "restarting in" in line]
    assert len(restarts) == 2 and all("sched: exited with status 3" in line for line in restarts), r.stdout


def test_a_clean_exit_is_not_restarted(tmp_path):
    r = _supervise("--name", "x", "--startup-s", "0", "--", *_child(tmp_path, "sys.exit(0)\n"))
    assert r.returncode == 0 and (tmp_path / "runs").read_text() == "x", r.stdout


def test_a_start_up_failure_is_reported_not_retried(tmp_path):
    r = _supervise("--name", "api", "--startup-s", "30", "--", *_child(tmp_path, "sys.exit(4)\n"))
    assert r.returncode == 4
    assert (tmp_path / "runs").read_text() == "x"
    assert "a start-up failure, not restarted" in r.stdout, r.stdout


def test_sigterm_is_forwarded_and_nothing_restarts(tmp_path):
    child = _child(tmp_path, "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1] + '.term')"
                             ".write_text('t'), sys.exit(0)))\npathlib.Path(sys.argv[1] + '.ready').write_text('r')\n"
                             "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, str(SUPERVISE), "--name", "w", "--startup-s", "0", "--", *child],
                         stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "runs.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "runs.ready").exists(), "the child never got to its SIGTERM handler"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert (tmp_path / "runs.term").read_text() == "t"
    assert (tmp_path / "runs").read_text() == "x"


def test_no_command_is_a_usage_error():
    r = _supervise("--name", "x")
    assert r.returncode == 2 and "no command given" in r.stderr


def test_restart_from_another_shell_keeps_the_settings_up_ran_with(tmp_path, monkeypatch):
    from cluster import cluster  # scripts/ is on pytest's path

    monkeypatch.setattr(cluster, "HOME", tmp_path)
    cfg = {"ports": {name: 30000 + off for name, off in cluster.PORTS.items()},
           "secrets": {"db_password": "db", "redis_password": "redis", "s3_access_key": "AK", "s3_secret_key": "SK",
                       "jwt_secret": "jwt", "api_secret_key": "api", "fernet_key": "fernet"}}
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "30")
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
    cluster.record_settings()  # what `up` does
    assert (tmp_path / "settings.json").stat().st_mode & 0o077 == 0
    # a later shell without them: restart starts the scheduler as `up` did
    monkeypatch.delenv("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT")
    monkeypatch.delenv("NIGHTSHIFT_CLUSTER_AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE")
    env = cluster.component_env(cfg, "scheduler")
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "30"
    # the caller's own value wins over the recorded one
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "45")
    assert cluster.component_env(cfg, "scheduler")["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "45"


def test_stop_refuses_an_unknown_component(tmp_path, monkeypatch, capsys):
    from cluster import cluster

    monkeypatch.setattr(cluster, "HOME", tmp_path)
    assert cluster.main(["stop", "postgress"]) == 1
    assert "unknown component(s) postgress" in capsys.readouterr().err


def test_airflow_components_are_spawned_supervised(tmp_path, monkeypatch):
    """The recorded PID is the supervisor's, with the component's command line after ``--``."""
    from cluster import cluster

    monkeypatch.setattr(cluster, "HOME", tmp_path)
    # cluster.py exits after spawning and init reaps the supervisor; here the test is its parent: let
    # the kernel reap it, so no zombie keeps the process group alive
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        _spawn_and_stop(cluster, tmp_path)
    finally:
        signal.signal(signal.SIGCHLD, old)


def _spawn_and_stop(cluster, tmp_path: Path) -> None:
    proc = cluster.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin"}, log_path=tmp_path / "sleeper.log", port=None, supervise=True)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(SUPERVISE).encode() in cmdline and b"--name" in cmdline and b"sleeper" in cmdline
    finally:
        cluster.stop_proc(proc, grace=10)
    assert not proc.alive and not cluster._group_alive(proc.pid)
