"""scripts/cluster/supervise.py: the cluster profile's process manager (restart on failure, never
after a clean exit or a stop, a start-up failure reported at once, signals forwarded)."""

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
