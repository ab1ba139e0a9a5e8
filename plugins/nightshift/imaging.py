"""Build the inference image: the ONNX model + the OIP server + pinned runtime wheels.

No Airflow here; :mod:`docker` is imported inside the functions that need it.

The image runs exactly the ``onnxruntime``/``numpy`` versions the model was
validated with: :func:`serving_requirements` pins them (and their runtime
dependencies) from the current environment, :func:`ensure_wheelhouse` fetches
those wheels once into a content-addressed folder, and the Dockerfile installs
them with ``pip install --no-index`` -- the build itself needs no network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as importlib_metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from nightshift.artifacts import atomic_dir, sha256_file
from nightshift.errors import BuildError, ConfigError

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The server package copied into every image.
SERVING_SRC = _PACKAGE_DIR / "serving"
#: The Dockerfile used unless the caller passes another one.
DOCKERFILE = _PACKAGE_DIR.parents[1] / "include" / "inference" / "Dockerfile"
#: What the serving code imports; everything else is their dependencies.
SERVING_ROOTS = ("onnxruntime", "numpy")

_ENSURE_BASE = "scripts/ensure_base_image.sh (or `make setup`)"
_ENSURE_DOCKER = "scripts/ensure_docker.sh (or `make setup`)"


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


# --------------------------------------------------------------------------- docker


def connect_docker(timeout_s: int = 600) -> Any:
    """A docker SDK client from the environment, checked with a ping.

    :raises BuildError: the daemon is unreachable; says how to start one.
    """
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise BuildError(
            f"cannot reach the Docker daemon at {host}: {exc}. Start one with {_ENSURE_DOCKER}, "
            "or point DOCKER_HOST at a running daemon."
        ) from exc
    return client


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


def _make_world_readable(root: Path) -> None:
    """0755 dirs, 0644 files: the image runs as a non-root user and COPY keeps modes
    (``atomic_write_*`` creates 0600 files)."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class ImageBuilder:
    """Builds one inference image; keeps the docker client so a build can be cancelled.

    An operator creates one, calls :meth:`build` in ``execute`` and
    :meth:`cancel` from ``on_kill``.

    :param docker_client: a ``docker.DockerClient``; default ``docker.from_env()``.
    """

    def __init__(self, docker_client: Any | None = None):
        self.client = docker_client
        self._cancelled = threading.Event()
        self._step_container: str | None = None  # the classic builder's container for the running RUN step

    def cancel(self) -> None:
        """Abort a running build (thread-safe; for ``on_kill``).

        The classic builder runs each ``RUN`` step in a container whose id it
        logs (``Running in <id>``); killing it fails the step and so the build,
        and ``forcerm`` removes it. The build loop also stops reading, which
        closes the connection and makes the daemon give up between steps.
        """
        self._cancelled.set()
        self._kill_step()

    def _kill_step(self) -> None:
        cid = self._step_container
        if cid is None or self.client is None:
            return
        try:
            self.client.api.kill(cid)
            self._step_container = None
            log.info("cancel: killed build step container %s", cid)
        except Exception as exc:  # noqa: BLE001 - best effort: it may have finished already
            log.info("cancel: could not kill build step container %s: %s", cid, exc)

    def build(
        self,
        *,
        onnx_path: str | os.PathLike[str],
        model_meta: dict[str, Any],
        model_name: str,
        tag: str,
        base_image: str,
        wheelhouse: str | os.PathLike[str],
        serving_src: str | os.PathLike[str] | None = None,
        dockerfile: str | os.PathLike[str] | None = None,
        labels: dict[str, str] | None = None,
        revision: str | None = None,
    ) -> dict[str, Any]:
        """Assemble a build context and build the image (see :func:`build_inference_image`)."""
        t0 = time.monotonic()
        onnx_path = Path(onnx_path)
        serving_src = Path(serving_src) if serving_src else SERVING_SRC
        dockerfile = Path(dockerfile) if dockerfile else DOCKERFILE
        if not onnx_path.is_file():
            raise BuildError(f"ONNX model {onnx_path} does not exist; run the export step first")
        if not (serving_src / "server.py").is_file():
            raise BuildError(f"serving source {serving_src} has no server.py")
        if not dockerfile.is_file():
            raise BuildError(f"Dockerfile {dockerfile} does not exist")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
            raise BuildError(f"model_name {model_name!r} must be letters, digits, '_', '.', '-' (it becomes a path)")
        if not isinstance(model_meta, dict):
            raise BuildError(f"model_meta must be a dict (model.json content), got {type(model_meta).__name__}")
        missing = [k for k in ("class_names", "input_shape") if k not in model_meta]
        if missing:
            raise BuildError(f"model_meta lacks {missing}; model.json must have class_names and input_shape")

        onnx_sha = sha256_file(onnx_path)
        if model_meta.get("onnx_sha256") not in (None, onnx_sha):
            raise BuildError(
                f"model_meta onnx_sha256 {model_meta['onnx_sha256']} does not match {onnx_path} (sha256 {onnx_sha}); "
                "the metadata belongs to a different export"
            )
        meta = {**model_meta, "name": model_name, "onnx_sha256": onnx_sha}
        version = str(meta.get("version", "unknown"))

        if self.client is None:
            self.client = connect_docker()
        client = self.client
        self._require_base_image(base_image)

        requirements = serving_requirements()
        wheels = ensure_wheelhouse(wheelhouse, requirements)

        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        buildargs = {
            "BASE_IMAGE": base_image,
            "MODEL_NAME": model_name,
            "MODEL_VERSION": version,
            "MODEL_SHA256": onnx_sha,
            "IMAGE_TITLE": f"nightshift-inference-{model_name}",
            "IMAGE_VERSION": version,
            "VCS_REF": revision or os.environ.get("NIGHTSHIFT_REVISION", "unknown"),
            "BUILD_DATE": created,
        }
        with tempfile.TemporaryDirectory(prefix="nightshift-build-") as ctx_name:
            ctx = Path(ctx_name)
            shutil.copy2(dockerfile, ctx / "Dockerfile")
            _copy_tree(serving_src, ctx / "serving")
            (ctx / "wheels").mkdir()
            for whl in wheels.glob("*.whl"):
                _link_or_copy(whl, ctx / "wheels" / whl.name)
            (ctx / "wheels" / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
            (ctx / "model").mkdir()
            shutil.copy2(onnx_path, ctx / "model" / "model.onnx")
            (ctx / "model" / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
            for sub in ("serving", "model"):
                _make_world_readable(ctx / sub)
            image_id, build_log = self._run_build(ctx, tag, buildargs, labels or {})

        try:
            image = client.images.get(tag)
        except Exception as exc:  # noqa: BLE001
            raise BuildError(f"the build of {tag} reported success but the image cannot be found: {exc}",
                             logs=build_log) from exc
        result = {
            "image": tag,
            "image_id": image.id or image_id,
            "size_bytes": int(image.attrs.get("Size", 0)),
            "base_image": base_image,
            "serving_requirements": requirements,
            "build_seconds": round(time.monotonic() - t0, 3),
            "labels": dict(image.labels or {}),
            "model_sha256": onnx_sha,
            "wheelhouse": str(wheels),
        }
        log.info("built %s (%s, %.1f MB) in %.1fs", tag, result["image_id"], result["size_bytes"] / 1e6,
                 result["build_seconds"])
        return result

    def _require_base_image(self, base_image: str) -> None:
        from docker.errors import APIError, ImageNotFound

        try:
            self.client.images.get(base_image)
        except ImageNotFound:
            raise BuildError(
                f"base image {base_image} is not in the local Docker daemon. Create it with {_ENSURE_BASE}, "
                "or set NIGHTSHIFT_BASE_IMAGE to an image with python3 and python3-venv that is present."
            ) from None
        except APIError as exc:
            raise BuildError(f"could not inspect base image {base_image}: {exc}") from exc

    def _run_build(self, ctx: Path, tag: str, buildargs: dict[str, str], labels: dict[str, str]) -> tuple[str, str]:
        from docker.errors import APIError, DockerException

        lines: list[str] = []
        image_id = ""
        error = ""
        log.info("docker build -t %s (context %s, base %s)", tag, ctx, buildargs["BASE_IMAGE"])
        try:
            stream = self.client.api.build(
                path=str(ctx), tag=tag, buildargs=buildargs, labels=labels or None,
                network_mode="host", decode=True, rm=True, forcerm=True, pull=False,
            )
            for chunk in stream:
                if self._cancelled.is_set():
                    self._kill_step()
                    stream.close()  # drops the connection: the daemon stops the build
                    break
                if "stream" in chunk:
                    text = chunk["stream"]
                    lines.append(text)
                    for line in text.rstrip("\n").splitlines():
                        if line.strip():
                            log.info("build | %s", line)
                    m = re.search(r"Successfully built ([0-9a-f]+)", text)
                    if m:
                        image_id = m.group(1)
                    m = re.search(r"---> Running in ([0-9a-f]+)", text)
                    if m:
                        self._step_container = m.group(1)
                        if self._cancelled.is_set():  # cancel() came before we knew the id
                            self._kill_step()
                    elif "Removing intermediate container" in text:
                        self._step_container = None
                elif "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                elif "error" in chunk or "errorDetail" in chunk:
                    error = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "unknown error")
                    lines.append(f"ERROR: {error}\n")
                    log.error("build | %s", error)
                elif "status" in chunk:
                    lines.append(f"{chunk['status']}\n")
        except (APIError, DockerException, OSError) as exc:
            if self._cancelled.is_set():
                raise BuildError(f"build of {tag} was cancelled", logs="".join(lines)) from exc
            raise BuildError(f"docker build of {tag} failed: {exc}", logs="".join(lines)) from exc
        except Exception as exc:  # requests/urllib3 errors when the connection is closed under us
            if self._cancelled.is_set():
                raise BuildError(f"build of {tag} was cancelled", logs="".join(lines)) from exc
            raise
        build_log = "".join(lines)
        if self._cancelled.is_set():
            raise BuildError(f"build of {tag} was cancelled", logs=build_log)
        if error:
            raise BuildError(f"docker build of {tag} failed: {error}", logs=build_log)
        if not image_id:
            raise BuildError(f"docker build of {tag} ended without reporting an image id", logs=build_log)
        return image_id, build_log


def build_inference_image(
    *,
    onnx_path: str | os.PathLike[str],
    model_meta: dict[str, Any],
    model_name: str,
    tag: str,
    base_image: str,
    wheelhouse: str | os.PathLike[str],
    serving_src: str | os.PathLike[str] | None = None,
    dockerfile: str | os.PathLike[str] | None = None,
    docker_client: Any | None = None,
    labels: dict[str, str] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Build the inference image for one exported model.

    The build context holds the Dockerfile (``include/inference``), ``serving/``
    (``plugins/nightshift/serving``), ``wheels/`` (:func:`ensure_wheelhouse`
    for :func:`serving_requirements`) and ``model/`` (``model.onnx`` and
    ``model.json``; ``name`` and ``onnx_sha256`` are set from the arguments).
    The model lands in ``/models/<model_name>``. The build uses the host
    network and the local base image only (no pull).

    :param onnx_path: the exported ``model.onnx``.
    :param model_meta: ``model.json`` content (``class_names``, ``input_shape``, ``version`` ...).
    :param model_name: the served model name (also the folder under ``/models``).
    :param tag: the image reference to build, e.g. ``nightshift/digits:3``; the caller decides.
    :param base_image: the local base image (python3 + venv), e.g. ``Settings.base_image``.
    :param wheelhouse: wheelhouse root (``Settings.wheelhouse``).
    :param serving_src: the server package to copy (default ``plugins/nightshift/serving``).
    :param dockerfile: the Dockerfile to use (default ``include/inference/Dockerfile``).
    :param docker_client: a ``docker.DockerClient`` (default ``docker.from_env()``).
    :param labels: extra image labels.
    :param revision: source revision for ``org.opencontainers.image.revision``
        (default ``$NIGHTSHIFT_REVISION`` or ``unknown``).
    :returns: ``image``, ``image_id``, ``size_bytes``, ``base_image``,
        ``serving_requirements``, ``build_seconds``, ``labels``, ``model_sha256``, ``wheelhouse``.
    :raises BuildError: the daemon is unreachable, the base image is missing, a
        wheel cannot be fetched, or the build failed (``logs`` holds the log).
    """
    return ImageBuilder(docker_client).build(
        onnx_path=onnx_path, model_meta=model_meta, model_name=model_name, tag=tag, base_image=base_image,
        wheelhouse=wheelhouse, serving_src=serving_src, dockerfile=dockerfile, labels=labels, revision=revision,
    )


def remove_image(tag: str, docker_client: Any | None = None) -> bool:
    """Remove an image (forced); ``False`` if it did not exist.

    :raises BuildError: the daemon refused for another reason.
    """
    from docker.errors import APIError, ImageNotFound

    client = docker_client or connect_docker()
    try:
        client.images.remove(tag, force=True)
    except ImageNotFound:
        return False
    except APIError as exc:
        raise BuildError(f"could not remove image {tag}: {exc}") from exc
    return True
