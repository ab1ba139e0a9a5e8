"""Build the inference image: the OIP server + pinned runtime wheels (+ the ONNX model).

No Airflow here; :mod:`docker` is imported inside the functions that need it,
and the operator passes a client in (``DockerHook`` when a connection is set).

Two variants (``variant=``):

* ``model-in-image`` (default): the model is baked in at ``/models/<name>``.
* ``model-load``: a generic server image with no model; the container reads
  ``MODEL_URI`` (directory, ``file://`` or ``.tar.gz`` path/URL) at start.

The tag is a **content key** over every build input -- the ONNX file's sha256,
``model.json``, the serving source tree, the collection's ``decode.py`` copied
into it, the Dockerfile, the pinned wheel list, the base image's id and the
variant -- so the same model and server give the same tag, and an image with
that tag (and the same ``ai.nightshift.build.key`` label) is reused without a
rebuild; any changed input gives a new tag. Labels that do not change the
image's behaviour (git SHA, build date) are not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nightshift.artifacts import sha256_file
from nightshift import containers
from nightshift.containers import MODEL_LABEL, ROLE_LABEL
from nightshift.errors import BuildError
from nightshift.wheelhouse import ensure_wheelhouse, serving_requirements

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The server package copied into every image.
SERVING_SRC = _PACKAGE_DIR / "serving"
#: The collection's decoding/statistics module, copied into the image as ``serving/decode.py``
#: (one source of truth for upload decoding and the request log's profile features).
DECODE_SRC = _PACKAGE_DIR / "data" / "decode.py"
#: The Dockerfile used unless the caller passes another one.
DOCKERFILE = _PACKAGE_DIR.parents[1] / "include" / "inference" / "Dockerfile"
VARIANTS = ("model-in-image", "model-load")
#: Label names (OCI + Nightshift); the promote/deploy/retention code reads these.
LABEL_KEY = "ai.nightshift.build.key"
LABEL_ROLE = ROLE_LABEL  # one set of names for images and the containers run from them
LABEL_MODEL = MODEL_LABEL
LABEL_VERSION = "ai.nightshift.model.version"
LABEL_SHA = "ai.nightshift.model.sha256"
LABEL_DATA = "ai.nightshift.data.digest"
LABEL_ORT = "ai.nightshift.onnxruntime.version"
LABEL_VARIANT = "ai.nightshift.variant"
ROLE_INFERENCE = "inference-image"

_ENSURE_BASE = "scripts/ensure_base_image.sh (or `make setup`)"


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not p.name.startswith(".") and p.suffix != ".pyc")


def serving_tree_sha256(serving_src: Path = SERVING_SRC, decode_src: Path = DECODE_SRC) -> str:
    """sha256 over the server package as copied into the image (paths and contents)."""
    h = hashlib.sha256()
    for p in _tree_files(serving_src):
        h.update(p.relative_to(serving_src).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    h.update(b"decode.py\0" + hashlib.sha256(decode_src.read_bytes()).digest())
    return h.hexdigest()


def build_key(*, onnx_sha256: str | None, model_json: str | None, serving_sha256: str, dockerfile_sha256: str,
              requirements: list[str], base_image_id: str, variant: str) -> str:
    """The content key of an inference image: sha256 over every build input."""
    doc = {"onnx_sha256": onnx_sha256, "model_json": model_json, "serving": serving_sha256,
           "dockerfile": dockerfile_sha256, "requirements": sorted(requirements), "base_image": base_image_id,
           "variant": variant, "format": 2}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def image_tag(repository: str, model_name: str | None, version: str | None, key: str) -> str:
    """``<repository>/<model>:<version>-<key[:16]>`` (model-load: ``<repository>/server:<key[:16]>``)."""
    if model_name is None:
        return f"{repository}/server:{key[:16]}"
    v = re.sub(r"[^A-Za-z0-9_.-]", "_", str(version or "unversioned"))[:64]
    return f"{repository}/{model_name.lower()}:{v}-{key[:16]}"


# --------------------------------------------------------------------------- docker


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
        onnx_path: str | os.PathLike[str] | None,
        model_meta: dict[str, Any] | None,
        model_name: str | None,
        repository: str = "nightshift",
        tag: str | None = None,
        base_image: str,
        wheelhouse: str | os.PathLike[str],
        variant: str = "model-in-image",
        serving_src: str | os.PathLike[str] | None = None,
        dockerfile: str | os.PathLike[str] | None = None,
        labels: dict[str, str] | None = None,
        revision: str | None = None,
        reuse: bool = True,
    ) -> dict[str, Any]:
        """Build (or reuse) the inference image for one exported model.

        The build context holds the Dockerfile (``include/inference``), ``serving/``
        (``plugins/nightshift/serving`` + ``data/decode.py``), ``wheels/``
        (:func:`~nightshift.wheelhouse.ensure_wheelhouse` for
        :func:`~nightshift.wheelhouse.serving_requirements`) and ``model/``
        (``model.onnx`` and ``model.json``; empty for ``model-load``). The model
        lands in ``/models/<model_name>``. The build uses the host network and the
        local base image only (no pull, no index).

        :param onnx_path: the exported ``model.onnx`` (``None`` for ``model-load``).
        :param model_meta: ``model.json`` content (``class_names``, ``input_shape``, ``version`` ...).
        :param model_name: the served model name (also the folder under ``/models``).
        :param base_image: the local base image (python3 + venv), e.g. ``Settings.base_image``.
        :param wheelhouse: wheelhouse root (``Settings.wheelhouse``).
        :param repository: image repository prefix; the tag is :func:`image_tag` of the content key.
        :param tag: an explicit tag instead (tests); reuse still checks the key label.
        :param variant: ``model-in-image`` or ``model-load``.
        :param labels: extra image labels.
        :param revision: source revision for ``org.opencontainers.image.revision``
            (default ``$NIGHTSHIFT_REVISION`` or ``unknown``).
        :param reuse: skip the build when an image with this tag and key exists.
        :returns: ``image``, ``image_id``, ``build_key``, ``reused``, ``size_bytes``, ``base_image``,
            ``serving_requirements``, ``build_seconds``, ``labels``, ``model_sha256``, ``wheelhouse``, ``repo_digests``.
        :raises BuildError: the daemon is unreachable, the base image is missing, a
            wheel cannot be fetched, or the build failed (``logs`` holds the log tail).
        """
        t0 = time.monotonic()
        if variant not in VARIANTS:
            raise BuildError(f"variant {variant!r} is not one of {VARIANTS}")
        in_image = variant == "model-in-image"
        serving_src = Path(serving_src) if serving_src else SERVING_SRC
        dockerfile = Path(dockerfile) if dockerfile else DOCKERFILE
        if not (serving_src / "server.py").is_file():
            raise BuildError(f"serving source {serving_src} has no server.py")
        if not dockerfile.is_file():
            raise BuildError(f"Dockerfile {dockerfile} does not exist")
        meta: dict[str, Any] | None = None
        onnx_sha = None
        version = None
        if in_image:
            if onnx_path is None or not Path(onnx_path).is_file():
                raise BuildError(f"ONNX model {onnx_path} does not exist; run the export step first")
            onnx_path = Path(onnx_path)
            if not model_name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
                raise BuildError(f"model_name {model_name!r} must be letters, digits, '_', '.', '-' (it becomes a path)")
            if not isinstance(model_meta, dict):
                raise BuildError(f"model_meta must be a dict (model.json content), got {type(model_meta).__name__}")
            missing = [k for k in ("class_names", "input_shape") if k not in model_meta]
            if missing:
                raise BuildError(f"model_meta lacks {missing}; model.json must have class_names and input_shape")
            onnx_sha = sha256_file(onnx_path)
            if model_meta.get("onnx_sha256") not in (None, onnx_sha):
                raise BuildError(
                    f"model_meta onnx_sha256 {model_meta['onnx_sha256']} does not match {onnx_path} (sha256 "
                    f"{onnx_sha}); the metadata belongs to a different export"
                )
            meta = {**model_meta, "name": model_name, "onnx_sha256": onnx_sha}
            version = str(meta.get("version", "unknown"))
        else:
            model_name = None

        if self.client is None:
            self.client = containers.connect_docker()
        client = self.client
        base_id = self._require_base_image(base_image)
        requirements = serving_requirements()
        ort_version = next((r.split("==")[1] for r in requirements if r.lower().startswith("onnxruntime==")), "")
        model_json = json.dumps(meta, indent=2, sort_keys=True) + "\n" if meta is not None else None
        key = build_key(onnx_sha256=onnx_sha, model_json=model_json, serving_sha256=serving_tree_sha256(serving_src),
                        dockerfile_sha256=sha256_file(dockerfile), requirements=requirements,
                        base_image_id=base_id, variant=variant)
        tag = tag or image_tag(repository, model_name, version, key)

        if reuse:
            existing = self._existing(tag, key)
            if existing is not None:
                log.info("image %s already built from the same inputs (key %s); reusing it", tag, key[:16])
                return self._result(existing, tag, key, base_image, requirements, t0, onnx_sha, None, reused=True)

        wheels = ensure_wheelhouse(wheelhouse, requirements)
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        buildargs = {
            "BASE_IMAGE": base_image,
            "VARIANT": variant,
            "MODEL_NAME": model_name or "model",
            "MODEL_VERSION": version or "",
            "MODEL_SHA256": onnx_sha or "",
            "DATA_DIGEST": str((meta or {}).get("data_digest") or ""),
            "ORT_VERSION": ort_version,
            "BUILD_KEY": key,
            "IMAGE_TITLE": f"nightshift-inference-{model_name}" if model_name else "nightshift-inference-server",
            "IMAGE_VERSION": version or key[:16],
            "VCS_REF": revision or os.environ.get("NIGHTSHIFT_REVISION", "unknown"),
            "BUILD_DATE": created,
        }
        with tempfile.TemporaryDirectory(prefix="nightshift-build-") as ctx_name:
            ctx = Path(ctx_name)
            shutil.copy2(dockerfile, ctx / "Dockerfile")
            _copy_tree(serving_src, ctx / "serving")
            shutil.copy2(DECODE_SRC, ctx / "serving" / "decode.py")
            (ctx / "wheels").mkdir()
            for whl in wheels.glob("*.whl"):
                _link_or_copy(whl, ctx / "wheels" / whl.name)
            (ctx / "wheels" / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
            (ctx / "model").mkdir()
            if meta is not None and onnx_path is not None:
                shutil.copy2(onnx_path, ctx / "model" / "model.onnx")
                (ctx / "model" / "model.json").write_text(model_json or "", "utf-8")
            else:
                (ctx / "model" / "README").write_text("model-load variant: the model comes from MODEL_URI\n")
            for sub in ("serving", "model"):
                _make_world_readable(ctx / sub)
            all_labels = {**(labels or {}), LABEL_ROLE: ROLE_INFERENCE}
            image_id, build_log = self._run_build(ctx, tag, buildargs, all_labels)

        try:
            image = client.images.get(tag)
        except Exception as exc:  # noqa: BLE001
            raise BuildError(f"the build of {tag} reported success but the image cannot be found: {exc}",
                             logs=build_log) from exc
        result = self._result(image, tag, key, base_image, requirements, t0, onnx_sha, str(wheels), reused=False)
        log.info("built %s (%s, %.1f MB) in %.1fs", tag, result["image_id"], result["size_bytes"] / 1e6,
                 result["build_seconds"])
        return result

    def _existing(self, tag: str, key: str) -> Any:
        from docker.errors import ImageNotFound

        try:
            image = self.client.images.get(tag)
        except ImageNotFound:
            return None
        if (image.labels or {}).get(LABEL_KEY) != key:
            log.warning("image %s exists but was built from other inputs (key %s, want %s); rebuilding",
                        tag, (image.labels or {}).get(LABEL_KEY), key)
            return None
        return image

    @staticmethod
    def _result(image: Any, tag: str, key: str, base_image: str, requirements: list[str], t0: float,
                onnx_sha: str | None, wheels: str | None, *, reused: bool) -> dict[str, Any]:
        return {
            "image": tag,
            "image_id": image.id,
            "build_key": key,
            "reused": reused,
            "size_bytes": int(image.attrs.get("Size", 0)),
            "base_image": base_image,
            "serving_requirements": requirements,
            "build_seconds": round(time.monotonic() - t0, 3),
            "labels": dict(image.labels or {}),
            "model_sha256": onnx_sha,
            "wheelhouse": wheels,
            "repo_digests": list(image.attrs.get("RepoDigests") or []),
        }

    def _require_base_image(self, base_image: str) -> str:
        from docker.errors import APIError, ImageNotFound

        try:
            return str(self.client.images.get(base_image).id)
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


def push_image(tag: str, registry: str, docker_client: Any, *, auth_config: dict[str, str] | None = None) -> dict:
    """Tag ``tag`` as ``<registry>/<repository>:<tag>`` and push it.

    :param registry: ``host:port`` of the registry, e.g. ``127.0.0.1:5000``.
    :returns: ``pushed`` (the remote reference) and ``digest`` (``sha256:...``).
    :raises BuildError: the push failed; carries the daemon's message.
    """
    from docker.errors import APIError

    repo, _, version = tag.rpartition(":")
    remote_repo = f"{registry.rstrip('/')}/{repo}"
    image = docker_client.images.get(tag)
    image.tag(remote_repo, version)
    digest, errors, lines = None, [], []
    try:
        for chunk in docker_client.api.push(remote_repo, tag=version, stream=True, decode=True,
                                            auth_config=auth_config):
            lines.append(json.dumps(chunk))
            if "error" in chunk or "errorDetail" in chunk:
                errors.append(chunk.get("error") or chunk["errorDetail"].get("message", "unknown error"))
            aux = chunk.get("aux") or {}
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = aux["Digest"]
    except APIError as exc:
        errors.append(str(exc))
    if errors or not digest:
        try:  # leave no dangling remote tag behind
            docker_client.images.remove(f"{remote_repo}:{version}")
        except APIError:
            pass
        raise BuildError(f"pushing {remote_repo}:{version} failed: {errors or 'no digest reported'}",
                         logs="\n".join(lines[-30:]))
    return {"pushed": f"{remote_repo}:{version}", "digest": digest}


def prune_candidates(docker_client: Any, *, repository: str, model_name: str, keep: int,
                     protect: set[str] | None = None) -> list[str]:
    """Remove old inference images of ``model_name``, newest ``keep`` kept; ``protect`` (tags or ids,
    e.g. the champion's image) is never removed.

    :returns: the tags removed.
    """
    from docker.errors import APIError

    if keep < 0:
        raise BuildError(f"retention keep must be >= 0, got {keep}")
    protect = protect or set()
    images = docker_client.images.list(filters={"label": [f"{LABEL_ROLE}={ROLE_INFERENCE}",
                                                          f"{LABEL_MODEL}={model_name}"]})
    prefix = f"{repository}/{model_name.lower()}:"
    mine = [im for im in images if any(t.startswith(prefix) for t in im.tags)]
    mine.sort(key=lambda im: im.attrs.get("Created", ""), reverse=True)
    removed: list[str] = []
    for im in mine[keep:]:
        if im.id in protect or any(t in protect for t in im.tags):
            continue
        for t in [t for t in im.tags if t.startswith(prefix)]:
            try:
                docker_client.images.remove(t, force=False)
                removed.append(t)
            except APIError as exc:  # in use by a container: keep it, say so
                log.warning("retention: could not remove %s: %s", t, exc)
    return removed


def remove_image(tag: str, docker_client: Any | None = None) -> bool:
    """Remove an image (forced); ``False`` if it did not exist.

    :raises BuildError: the daemon refused for another reason.
    """
    from docker.errors import APIError, ImageNotFound

    client = docker_client or containers.connect_docker()
    try:
        client.images.remove(tag, force=True)
    except ImageNotFound:
        return False
    except APIError as exc:
        raise BuildError(f"could not remove image {tag}: {exc}") from exc
    return True
