"""The serving wheelhouse: pinned runtime wheels for the inference image, fetched once.

No Airflow, no docker. The image runs exactly the versions the model was
validated with: :func:`serving_requirements` pins the server's imports (and
their runtime dependencies) from the current environment, and
:func:`ensure_wheelhouse` fetches those wheels once into a content-addressed
folder; the Dockerfile installs them with ``pip install --no-index``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as importlib_metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from nightshift.artifacts import atomic_dir
from nightshift.errors import BuildError, ConfigError

log = logging.getLogger(__name__)

#: What the serving code imports (``plugins/nightshift/serving``); everything else is their dependencies.
#: onnxruntime + numpy run the model; uvicorn + httptools + uvloop are the HTTP stack; grpcio + protobuf
#: the OIP gRPC service (its committed stubs check both versions at import: protobuf's runtime must be
#: at least the version they were generated for, ``scripts/gen_grpc_stubs.py``); prometheus_client
#: serves /metrics; pillow decodes uploads on /classify.
SERVING_ROOTS = ("onnxruntime", "numpy", "uvicorn", "httptools", "uvloop", "grpcio", "protobuf",
                 "prometheus_client", "pillow")

# --------------------------------------------------------------------------- requirements


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def serving_requirements(roots: Iterable[str] = SERVING_ROOTS) -> list[str]:
    """Pinned ``name==version`` lines for the serving runtime, from this environment.

    Walks ``Requires-Dist`` of each root recursively, skipping requirements
    whose environment marker does not apply here (extras, other platforms).

    :param roots: distributions the server imports (default onnxruntime, numpy).
    :returns: sorted, de-duplicated pins, e.g. ``["numpy==2.4.6", "onnxruntime==1.31.1", ...]``.
    :raises ConfigError: a root or one of its dependencies is not installed.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    pins: dict[str, str] = {}
    stack: list[tuple[str, str]] = [(r, "serving runtime") for r in roots]
    while stack:
        name, wanted_by = stack.pop()
        key = _canonical(name)
        if key in pins:
            continue
        try:
            dist = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            raise ConfigError(
                f"{name} (required by {wanted_by}) is not installed in this environment ({sys.executable}); "
                "the inference image pins the versions installed here, so install it first"
            ) from None
        pins[key] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement as exc:
                log.warning("ignoring unparsable requirement %r of %s: %s", line, name, exc)
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            stack.append((req.name, f"{dist.metadata['Name']}"))
    return sorted(pins.values(), key=str.lower)


# --------------------------------------------------------------------------- wheelhouse


def _wheelhouse_key(requirements: list[str]) -> str:
    # Wheels are interpreter- and platform-specific, so both are part of the key.
    tag = f"{sys.implementation.cache_tag}-{platform.system().lower()}-{platform.machine()}"
    text = "\n".join(sorted(requirements)) + "\n" + tag
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _has_wheel(folder: Path, requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    return any(p.name.lower().startswith(prefix.lower()) for p in folder.glob("*.whl"))


def ensure_wheelhouse(wheelhouse: str | os.PathLike[str], requirements: list[str], *, timeout_s: float = 900) -> Path:
    """Make (or reuse) ``<wheelhouse>/<key>/`` holding one wheel per pinned requirement.

    ``key`` hashes the requirements and this interpreter's tag. The folder is
    filled with ``pip download --only-binary=:all: --no-deps`` one requirement
    at a time (so a failure names its package) in a temporary sibling that is
    renamed into place, and gets a ``requirements.txt``.

    :param wheelhouse: the wheelhouse root (``Settings.wheelhouse``).
    :param requirements: pinned ``name==version`` lines (:func:`serving_requirements`).
    :param timeout_s: per-download time limit.
    :returns: the folder with the wheels and ``requirements.txt``.
    :raises BuildError: a wheel could not be downloaded; says which and how to fix it.
    """
    if not requirements:
        raise ConfigError("ensure_wheelhouse: requirements is empty; expected pinned name==version lines")
    for r in requirements:
        if "==" not in r:
            raise ConfigError(f"ensure_wheelhouse: requirement {r!r} is not pinned (expected name==version)")
    root = Path(wheelhouse)
    final = root / _wheelhouse_key(requirements)
    req_text = "\n".join(requirements) + "\n"
    if (final / "requirements.txt").is_file() and all(_has_wheel(final, r) for r in requirements):
        log.info("wheelhouse: reusing %s", final)
        return final
    if final.exists():  # incomplete (someone pre-populated only part of it): fill the gaps
        log.info("wheelhouse: %s is incomplete; downloading the missing wheels", final)

    with atomic_dir(final, replace=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; other users (and docker builds) read it
        if final.exists():
            for whl in final.glob("*.whl"):
                shutil.copy2(whl, tmp / whl.name)
        for req in requirements:
            if _has_wheel(tmp, req):
                continue
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                   "--disable-pip-version-check", "--no-input", "-d", str(tmp), req]
            log.info("wheelhouse: %s", " ".join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired as exc:
                raise BuildError(
                    f"downloading the wheel for {req} timed out after {timeout_s:.0f}s. "
                    f"{_wheelhouse_help(final, requirements)}"
                ) from exc
            if proc.returncode != 0 or not _has_wheel(tmp, req):
                raise BuildError(
                    f"could not download a wheel for {req} (pip exit status {proc.returncode}). "
                    f"{_wheelhouse_help(final, requirements)}",
                    logs=(proc.stdout or "") + (proc.stderr or ""),
                )
        (tmp / "requirements.txt").write_text(req_text, encoding="utf-8")
    log.info("wheelhouse: ready at %s (%d wheels)", final, len(requirements))
    return final


def _wheelhouse_help(folder: Path, requirements: list[str]) -> str:
    return (
        "The inference image installs wheels without network, so they must be in the wheelhouse first. "
        f"Fix: on a machine with package access run `pip download --only-binary=:all: --no-deps -d {folder} "
        f"{' '.join(requirements)}` (same Python {sys.version_info.major}.{sys.version_info.minor}, same platform) "
        f"and copy the folder there, or set NIGHTSHIFT_WHEELHOUSE to a wheelhouse that already has them, "
        "or configure pip (PIP_INDEX_URL / PIP_FIND_LINKS) so these pins can be downloaded."
    )
