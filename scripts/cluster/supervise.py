"""Keep one server process running, as systemd's ``Restart=on-failure`` or a Kubernetes pod's
restart policy does in production: ``supervise.py --name scheduler -- airflow scheduler ...``.

Airflow's scheduler, dag-processor and triggerer exit when their metadata database goes away
(a Postgres restart: ``OperationalError``); production deployments rely on a process manager to
start them again, and so does the cluster profile (``cluster.py`` starts every Airflow component
through this script). The rules:

- the child exits 0, or is stopped by the SIGTERM/SIGINT this process got (``cluster.py down`` /
  ``restart``): this process exits with the child's status, nothing is restarted;
- the child's *first* run ends in failure within ``--startup-s``: a start-up failure
  (configuration, a taken port), not an outage; this process exits with the child's status, so
  ``cluster.py up`` reports it at once instead of waiting on a restart loop;
- otherwise the child is started again after a back-off (1 s, doubling to 30 s; back to 1 s after
  a run that lasted ``--startup-s`` or more), each restart one line in the log.

SIGTERM/SIGINT are forwarded to the child. The child stays in this process's process group,
so ``cluster.py``'s group signal reaches both. Standard library only: this process stays small.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

MAX_BACKOFF_S = 30.0


def log(name: str, msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervise: {name}: {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="what the log lines call the child")
    ap.add_argument("--startup-s", type=float, default=15.0,
                    help="a first run that fails sooner is a start-up failure (not restarted)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command line of the child")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (supervise.py --name NAME -- COMMAND ...)")

    state: dict = {"stopping": False, "child": None}

    def forward(signum: int, _frame) -> None:
        state["stopping"] = True
        child = state["child"]
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    backoff, first = 1.0, True
    while True:
        started = time.monotonic()
        state["child"] = subprocess.Popen(command)
        if state["stopping"]:  # the signal came before the child was there to forward it to
            state["child"].terminate()
        rc = state["child"].wait()
        ran_s = time.monotonic() - started
        if rc < 0:  # killed by a signal: the shell's convention
            rc = 128 - rc
        if state["stopping"] or rc == 0:
            return rc
        if first and ran_s < args.startup_s:
            log(args.name, f"exited with status {rc} {ran_s:.0f}s after its start: a start-up failure, not restarted")
            return rc
        first = False
        if ran_s >= args.startup_s:
            backoff = 1.0
        log(args.name, f"exited with status {rc} after {ran_s:.0f}s; restarting in {backoff:.0f}s")
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not state["stopping"]:
            time.sleep(0.2)
        if state["stopping"]:
            return rc
        backoff = min(MAX_BACKOFF_S, backoff * 2)


if __name__ == "__main__":
    sys.exit(main())
