"""Create the serving bench's peer virtualenvs (KServe, PyTriton) with exact pins.

    python bench/peers/setup.py [kserve] [pytriton] [--python /usr/bin/python3] [--force]

Each peer gets ``.nightshift/bench-peers/<peer>/venv`` (git-ignored) with
``bench/peers/<peer>/requirements.txt`` installed. None of this is the project's
environment: the peers are benchmark opponents, and their dependencies (KServe's
FastAPI/pydantic, PyTriton's bundled ``tritonserver``) would clash with Airflow's.

The venvs are made from Debian's own ``/usr/bin/python3``: the Triton Python backend
stub that PyTriton bundles links the system's ``libpython3.11.so.1.0``
(``/lib/x86_64-linux-gnu``), so the venv's interpreter must be that same Debian build,
not a pyenv-built 3.11 beside it. A venv whose ``.requirements.sha256`` matches its
requirements file is kept as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS = ("kserve", "pytriton")
#: where the peers' venvs live (under the git-ignored .nightshift/)
VENV_ROOT = ROOT / ".nightshift" / "bench-peers"


def venv_python(peer: str) -> Path:
    """The interpreter of ``peer``'s virtualenv."""
    return VENV_ROOT / peer / "venv" / "bin" / "python"


def requirements_digest(peer: str) -> str:
    return hashlib.sha256((HERE / peer / "requirements.txt").read_bytes()).hexdigest()


def is_current(peer: str) -> bool:
    """True when ``peer``'s venv exists and was installed from today's requirements file."""
    stamp = VENV_ROOT / peer / "venv" / ".requirements.sha256"
    return venv_python(peer).is_file() and stamp.is_file() and stamp.read_text().strip() == requirements_digest(peer)


def ensure(peer: str, python: str = "/usr/bin/python3", force: bool = False) -> Path:
    """Create (or keep) ``peer``'s venv; its interpreter's path. Raises ``RuntimeError`` saying which step failed."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    venv = VENV_ROOT / peer / "venv"
    if is_current(peer) and not force:
        return venv_python(peer)
    if not Path(python).is_file():
        raise RuntimeError(f"{python} is missing: the peers' venvs are made from Debian's python3 package "
                           "(apt-get install python3 python3-venv)")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[python, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r",
              str(HERE / peer / "requirements.txt")]]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{peer}: `{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
    (venv / ".requirements.sha256").write_text(requirements_digest(peer) + "\n")
    return venv_python(peer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="create the serving bench's peer virtualenvs")
    ap.add_argument("peers", nargs="*", default=list(PEERS), help=f"any of {', '.join(PEERS)} (default: all)")
    ap.add_argument("--python", default="/usr/bin/python3", help="interpreter that makes the venvs")
    ap.add_argument("--force", action="store_true", help="recreate even when the venv is current")
    args = ap.parse_args(argv)
    failed = 0
    for peer in args.peers:
        try:
            print(f"{peer}: {ensure(peer, args.python, args.force)}", flush=True)
        except RuntimeError as exc:
            print(f"{peer}: FAILED: {exc}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
