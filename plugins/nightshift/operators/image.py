from __future__ import annotations

import os
from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator


class BuildInferenceImageOperator(NightshiftOperator):
    """Build (or reuse) the ONNX Runtime inference image for the exported model.

    The tag is a content key over every build input (ONNX sha256, ``model.json``,
    server source, Dockerfile, pinned wheels, base image id, variant):
    ``<repository>/<model_name>:<version>-<key[:16]>``. An image with that tag and
    key is reused without a rebuild. Serving wheels are pinned to the versions
    installed where the model was validated; the image runs as a non-root user,
    has a ``HEALTHCHECK`` and OCI labels (model name, version, ONNX sha256, data
    digest, git SHA, onnxruntime version).

    :param export: the ``export_onnx`` result (XCom). (templated)
    :param model_name: served model name. (templated)
    :param repository: image repository prefix. (templated)
    :param base_image: base image with python3; default ``$NIGHTSHIFT_BASE_IMAGE``. (templated)
    :param variant: ``model-in-image`` (default) or ``model-load`` (a generic
        server that reads ``MODEL_URI`` at start). (templated)
    :param docker_conn_id: the Airflow connection of the Docker daemon (extra ``docker_url``,
        TLS extras, registry login), through the docker provider's ``DockerHook``
        (:func:`nightshift.operators.base.resolve_docker_client`); ``None``:
        ``$NIGHTSHIFT_DOCKER_CONN_ID`` where the task runs, else ``DOCKER_HOST`` or the local
        socket. (templated)
    :param registry: ``host:port`` to push the image to after the build;
        default ``$NIGHTSHIFT_REGISTRY``; empty means no push. (templated)
    :param keep_images: retention: newest inference images of this model to
        keep; older ones are removed unless listed in ``protect`` (the
        champion's image) or in use. ``None`` disables. (templated)
    :param protect: image tags or ids never removed by retention. (templated)
    """

    template_fields: Sequence[str] = ("export", "model_name", "repository", "base_image", "variant", "registry",
                                      "keep_images", "protect", "docker_conn_id")
    #: what of the run folder it reads (fetched first on an object store): nothing (the model: export XCom)
    run_folder_reads: Sequence[str] = ()
    ui_color = "#bbdefb"

    def __init__(self, *, export: Any, model_name: str = "nightshift-classifier", repository: str = "nightshift",
                 base_image: str | None = None, variant: str = "model-in-image", docker_conn_id: str | None = None,
                 registry: str | None = None, keep_images: int | str | None = 5,
                 protect: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export = export
        self.model_name = model_name
        self.repository = repository
        self.base_image = base_image
        self.variant = variant
        self.docker_conn_id = docker_conn_id
        self.registry = registry
        self.keep_images = keep_images
        self.protect = protect
        self._builder = None

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.inference_image import ImageBuilder, prune_candidates, push_image

        in_image = self.variant == "model-in-image"
        export = self.require(self.export, "export", "export_onnx") if in_image else (self.export or {})
        client = self.docker_client()
        self._builder = ImageBuilder(client)
        result = self._builder.build(
            onnx_path=export.get("onnx_path"), model_meta=export.get("model_meta"),
            model_name=self.model_name if in_image else None, repository=self.repository,
            base_image=self.base_image or self.settings.base_image, wheelhouse=self.settings.wheelhouse,
            variant=self.variant, revision=os.environ.get("NIGHTSHIFT_REVISION"),
        )
        self.log.info("%s %s (%s, %.1f MB) in %.1fs", "Reused" if result["reused"] else "Built", result["image"],
                      result["image_id"][:19], result["size_bytes"] / 1e6, result["build_seconds"])
        registry = self.registry if self.registry is not None else os.environ.get("NIGHTSHIFT_REGISTRY", "")
        if registry:
            pushed = push_image(result["image"], registry, client)
            result.update(pushed)
            self.log.info("Pushed %s (%s)", pushed["pushed"], pushed["digest"])
        if self.keep_images not in (None, "", "None") and in_image:
            protect = self.protected_images(result)
            if protect is None:
                result["removed_images"] = []
            else:
                removed = prune_candidates(client, repository=self.repository,
                                           model_name=self.model_name, keep=int(self.keep_images), protect=protect)
                if removed:
                    self.log.info("Retention removed %d old image(s): %s", len(removed), removed)
                result["removed_images"] = removed
        keys = ("image", "image_id", "build_key", "reused", "size_bytes", "base_image", "serving_requirements",
                "build_seconds", "labels", "pushed", "digest", "removed_images")
        return {k: result[k] for k in keys if k in result}

    def protected_images(self, result: dict[str, Any]) -> set[str] | None:
        """Images retention must never remove: this build, ``protect``, the images of the
        versions holding the ``champion`` and ``challenger`` aliases, and what the local
        deployment serves now and served before (the rollback target).

        :returns: ``None`` when the registry cannot be read: which image is the
            champion's is then unknown, so nothing is removed (fail closed).
        """
        from nightshift import contracts, registry, state
        from nightshift.errors import RegistryError
        from nightshift.store import StoreError

        keep = {result["image"], result["image_id"], *(self.protect or [])}
        try:
            versions = [registry.get_champion(self.mlflow, self.model_name),
                        registry.get_alias(self.mlflow, self.model_name, contracts.CHALLENGER)]
        except RegistryError as exc:
            self.log.warning("Retention skipped: cannot tell which image is the champion's (%s)", exc)
            return None
        for mv in versions:
            tags = (mv or {}).get("tags") or {}
            keep.update(t for t in (tags.get(contracts.tag(contracts.VersionTag.IMAGE)),
                                    tags.get(contracts.tag(contracts.VersionTag.IMAGE_ID))) if t)
        try:  # from the store: the deploy that wrote it may have run on another worker
            deployed = state.read_deployment(self.store, self.model_name)
        except StoreError as exc:
            self.log.warning("Retention skipped: the deployment state of %s is unreadable (%s)", self.model_name, exc)
            return None
        if deployed is not None:
            for entry in (deployed, deployed.get("previous") or {}):
                keep.update(v for v in (entry.get("image"), entry.get("image_id")) if v)
        keep.discard(None)
        return keep

    def on_kill(self) -> None:
        if self._builder is not None:
            self._builder.cancel()
