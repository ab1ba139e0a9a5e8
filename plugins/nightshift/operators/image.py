from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator


class BuildInferenceImageOperator(NightshiftOperator):
    """Build the ONNX Runtime inference image with the model inside.

    Serving wheels are pinned to the versions installed where the model was
    validated; the image runs as a non-root user and is tagged
    ``<repository>/<model_name>:<onnx sha256[:12]>``.

    :param export: the ``export_onnx`` result (XCom). (templated)
    :param model_name: served model name. (templated)
    :param repository: image repository prefix. (templated)
    :param base_image: base image with python3; default ``$NIGHTSHIFT_BASE_IMAGE``. (templated)
    """

    template_fields: Sequence[str] = ("export", "model_name", "repository", "base_image")
    ui_color = "#bbdefb"

    def __init__(self, *, export: Any, model_name: str = "nightshift-classifier", repository: str = "nightshift",
                 base_image: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export = export
        self.model_name = model_name
        self.repository = repository
        self.base_image = base_image
        self._builder = None

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.imaging import ImageBuilder

        export = self.require(self.export, "export", "export_onnx")
        tag = f"{self.repository}/{self.model_name}:{export['onnx_sha256'][:12]}"
        self._builder = ImageBuilder()
        result = self._builder.build(
            onnx_path=export["onnx_path"], model_meta=export["model_meta"], model_name=self.model_name, tag=tag,
            base_image=self.base_image or self.settings.base_image, wheelhouse=self.settings.wheelhouse,
        )
        self.log.info("Built %s (%s, %.1f MB) in %.1fs", result["image"], result["image_id"][:19],
                      result["size_bytes"] / 1e6, result["build_seconds"])
        return {k: result[k] for k in ("image", "image_id", "size_bytes", "base_image", "serving_requirements",
                                       "build_seconds")}

    def on_kill(self) -> None:
        if self._builder is not None:
            self._builder.cancel()
