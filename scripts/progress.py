"""Follow an ``airflow dags test`` log while it is written and print one line per
task as it starts and ends (state and duration), instead of the full log.

    python scripts/progress.py LOG PID     # until process PID exits

A Human-in-the-loop task (``approve_promotion``) that waits for a person is said
at once, with the Airflow UI page that answers it and the shell command that
does, and said again every ``NIGHTSHIFT_WAIT_HINT_S`` seconds (default 45)
while the run waits: ``airflow dags test`` itself waits silently, for days.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from approve import answer_command, required_actions_url  # noqa: E402 - the sibling script

START = re.compile(r"\[DAG TEST\] running task <TaskInstance: (?P<dag>[^.\s]+)\.(?P<task>\S+) (?P<run>\S+) "
                   r".*?ti_id=(?P<ti>[0-9a-f-]+)")
STATE = re.compile(r"Task instance state updated .*?new_state=(?P<state>\w+).*?ti_id=(?P<ti>[0-9a-f-]+)")
END = re.compile(r"\[DAG TEST\] end task task_id=(?P<task>\S+)")
#: dag.test() logs this about once a second while Human-in-the-loop tasks wait for an answer
WAITING = re.compile(r"Waiting for Human-in-the-loop input for tasks: (?P<tasks>\[[^\]]*\])")
HINT_EVERY_S = float(os.environ.get("NIGHTSHIFT_WAIT_HINT_S", "45"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of our parent shell still "exists": check /proc where there is one
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


class Progress:
    """What the terminal shows for a stream of log lines; ``clock`` gives seconds (monotonic)."""

    def __init__(self, *, clock=time.monotonic, out=None, hint_every_s: float = HINT_EVERY_S) -> None:
        self.clock, self.out, self.hint_every_s = clock, out or sys.stdout, hint_every_s
        self.t0 = clock()
        self.tasks: dict[str, str] = {}          # ti id -> task id
        self.started: dict[str, float] = {}
        self.reported: set[str] = set()
        self.run: dict[str, tuple[str, str]] = {}  # task id -> (dag id, run id)
        self.waiting: dict[str, float] = {}      # task waiting for a person -> since
        self.hinted_at = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _stamp(self, now: float) -> str:
        return f"[{int(now - self.t0) // 60:02d}:{int(now - self.t0) % 60:02d}]"

    def line(self, line: str) -> None:
        now = self.clock()
        stamp = self._stamp(now)
        if m := START.search(line):
            self.tasks[m["ti"]] = m["task"]
            self.started[m["task"]] = now
            self.run[m["task"]] = (m["dag"], m["run"])
            self.reported.discard(m["task"])
            if self.waiting.pop(m["task"], None) is not None:
                self._print(f"  {stamp} {m['task']:<24} wait over (answered, timed out or superseded)")
            self._print(f"  {stamp} {m['task']:<24} running ...")
        elif (m := STATE.search(line)) and m["ti"] in self.tasks:
            task = self.tasks[m["ti"]]
            self.reported.add(task)
            took = now - self.started.get(task, now)
            if m["state"] == "awaiting_input":
                self._print(f"  {stamp} {task:<24} AWAITING INPUT ({took:.1f} s)")
            else:  # e.g. failed when the request timed out: no longer waiting
                self.waiting.pop(task, None)
                self._print(f"  {stamp} {task:<24} {m['state'].upper()} ({took:.1f} s)")
        elif (m := END.search(line)) and m["task"] not in self.reported:
            self.reported.add(m["task"])
            self._print(f"  {stamp} {m['task']:<24} done")
        elif m := WAITING.search(line):
            try:
                tasks = [str(t) for t in ast.literal_eval(m["tasks"])]
            except (ValueError, SyntaxError):
                tasks = []
            new = [t for t in tasks if t not in self.waiting]
            for t in tasks:
                self.waiting.setdefault(t, now)
            if new:
                self._hint(now, first=True)
        self.tick()

    def tick(self) -> None:
        """Say again, every ``hint_every_s``, that the run still waits for a person."""
        now = self.clock()
        if self.waiting and now - self.hinted_at >= self.hint_every_s:
            self._hint(now, first=False)

    def _hint(self, now: float, *, first: bool) -> None:
        self.hinted_at = now
        stamp = self._stamp(now)
        for task, since in sorted(self.waiting.items()):
            dag, run = self.run.get(task, ("nightly_retrain", None))
            url = required_actions_url(dag, run, task)
            if first:
                self._print(f"  {stamp} {task:<24} WAITING FOR A PERSON: the run stops here until someone "
                            "approves or rejects it\n"
                            f"          answer in the Airflow UI (run `make airflow-ui` in another terminal): {url}\n"
                            f"          or from a shell, with `make airflow-ui` running:\n"
                            f"            {answer_command(run, 'approve', dag)}\n"
                            f"            {answer_command(run, 'reject', dag)}\n"
                            "          Ctrl-C stops waiting (nothing is promoted); the request stays open in Airflow")
            else:
                waited = int(now - since)
                self._print(f"  {stamp} {task:<24} still WAITING FOR A PERSON ({waited // 60} min {waited % 60:02d} s): "
                            f"{url}  or  {answer_command(run, 'approve', dag)}")


def follow(path: str, pid: int, progress: Progress | None = None) -> None:
    p = progress or Progress()
    while not os.path.exists(path) and _alive(pid):
        time.sleep(0.2)
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = ""
        while True:
            chunk = f.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    p.line(line)
                continue
            if not _alive(pid):
                for line in (buf + f.read()).split("\n"):
                    p.line(line)
                return
            p.tick()
            time.sleep(0.3)


if __name__ == "__main__":
    try:
        follow(sys.argv[1], int(sys.argv[2]))
    except KeyboardInterrupt:  # Ctrl-C: run_pipeline.sh stops the run and prints the summary
        pass
