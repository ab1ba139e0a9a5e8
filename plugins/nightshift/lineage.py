"""Where a model came from: the project's git commit, the installed packages, the
runtime versions. Cheap (no ``pip`` subprocess), never raises: a value that cannot
be found is ``"unknown"`` or ``None``.

No Airflow and no torch import at module level; :func:`runtime_versions` imports
torch only when called.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

#: Environment variable that carries the commit where there is no git checkout
#: (a Docker image built from the project: set it at build time).
GIT_SHA_ENV = "NIGHTSHIFT_GIT_SHA"


@functools.lru_cache(maxsize=8)
def _git(args: tuple[str, ...], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _code_dir() -> str:
    return str(Path(__file__).resolve().parent)


def git_sha() -> str:
    """The commit of the checkout this code runs from (``git rev-parse HEAD``), else
    ``$NIGHTSHIFT_GIT_SHA``, else ``"unknown"``. Never raises."""
    sha = _git(("rev-parse", "HEAD"), _code_dir())
    if sha and len(sha) >= 7 and all(ch in "0123456789abcdef" for ch in sha.lower()):
        return sha
    return os.environ.get(GIT_SHA_ENV, "").strip() or "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from :func:`git_sha`'s commit; None without a checkout."""
    out = _git(("status", "--porcelain", "--untracked-files=no"), _code_dir())
    return None if out is None else bool(out)


def package_versions() -> list[str]:
    """Installed distributions as sorted ``name==version`` lines (a ``pip freeze``
    without the subprocess; read once per process)."""
    return list(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[str, ...]:
    from importlib import metadata

    seen: dict[str, str] = {}
    try:
        for dist in metadata.distributions():
            name = (dist.metadata.get("Name") or "").strip()
            if name and name.lower() not in seen:
                seen[name.lower()] = f"{name}=={dist.version}"
    except Exception:  # noqa: BLE001 - a broken dist-info must not fail a training run
        pass
    return tuple(sorted(seen.values(), key=str.lower))


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def runtime_versions() -> dict[str, Any]:
    """python, torch, CUDA (torch's build), cuDNN, numpy and onnxruntime versions (None where absent)."""
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": None, "cuda": None, "cudnn": None,
                                "numpy": _dist_version("numpy"),
                                "onnxruntime": _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu")}
    try:
        import torch

        versions["torch"] = str(torch.__version__)  # plain str: TorchVersion is not weights_only-loadable
        versions["cuda"] = None if torch.version.cuda is None else str(torch.version.cuda)
        try:
            cudnn = torch.backends.cudnn.version()
            versions["cudnn"] = None if cudnn is None else int(cudnn)
        except Exception:  # noqa: BLE001 - no cuDNN in a CPU build
            versions["cudnn"] = None
    except ImportError:
        pass
    return versions


def environment_manifest() -> dict[str, Any]:
    """The lineage fields a training run records: git commit (and whether the
    checkout had local changes), runtime versions, installed packages."""
    return {"git_sha": git_sha(), "git_dirty": git_dirty(), "versions": runtime_versions(),
            "packages": package_versions()}
