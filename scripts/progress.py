"""Follow an ``airflow dags test`` log while it is written and print one line per
task as it starts and ends (state and duration), instead of the full log.

    python scripts/progress.py LOG PID     # until process PID exits
"""

from __future__ import annotations

import os
import re
import sys
import time

START = re.compile(r"\[DAG TEST\] running task <TaskInstance: [^.\s]+\.(?P<task>\S+) .*?ti_id=(?P<ti>[0-9a-f-]+)")
STATE = re.compile(r"Task instance state updated .*?new_state=(?P<state>\w+).*?ti_id=(?P<ti>[0-9a-f-]+)")
END = re.compile(r"\[DAG TEST\] end task task_id=(?P<task>\S+)")


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


def follow(path: str, pid: int) -> None:
    t0 = time.monotonic()
    tasks: dict[str, str] = {}
    started: dict[str, float] = {}
    reported: set[str] = set()
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
                    _line(line, t0, tasks, started, reported)
                continue
            if not _alive(pid):
                for line in (buf + f.read()).split("\n"):
                    _line(line, t0, tasks, started, reported)
                return
            time.sleep(0.3)


def _line(line: str, t0: float, tasks: dict[str, str], started: dict[str, float], reported: set[str]) -> None:
    now = time.monotonic()
    stamp = f"[{int(now - t0) // 60:02d}:{int(now - t0) % 60:02d}]"
    if m := START.search(line):
        tasks[m["ti"]] = m["task"]
        started[m["task"]] = now
        print(f"  {stamp} {m['task']:<24} running ...", flush=True)
    elif (m := STATE.search(line)) and m["ti"] in tasks:
        task = tasks[m["ti"]]
        reported.add(task)
        took = now - started.get(task, now)
        print(f"  {stamp} {task:<24} {m['state'].upper()} ({took:.1f} s)", flush=True)
    elif (m := END.search(line)) and m["task"] not in reported:
        reported.add(m["task"])
        print(f"  {stamp} {m['task']:<24} done", flush=True)


if __name__ == "__main__":
    follow(sys.argv[1], int(sys.argv[2]))
