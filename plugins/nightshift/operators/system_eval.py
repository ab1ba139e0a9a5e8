from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import SystemEvalReportLink


class SystemEvalOperator(NightshiftOperator):
    """Run the inference image on loopback and send the whole test split through
    the Open Inference Protocol. Measures accuracy, p50/p95/p99 latency,
    throughput and errors. The container is always removed (``on_kill`` too).

    :param image: the ``build_inference_image`` result (XCom). (templated)
    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param model_name: served model name. (templated)
    :param batch_size: images per request. (templated)
    :param ready_timeout_s: how long the server may take to become ready. (templated)
    """

    template_fields: Sequence[str] = ("image", "snapshot", "model_name", "batch_size", "ready_timeout_s")
    ui_color = "#b2ebf2"
    operator_extra_links = (SystemEvalReportLink(),)

    def __init__(self, *, image: Any, snapshot: Any, model_name: str = "nightshift-classifier",
                 batch_size: int = 1, ready_timeout_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.snapshot = snapshot
        self.model_name = model_name
        self.batch_size = batch_size
        self.ready_timeout_s = ready_timeout_s
        self._container = None

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.artifacts import atomic_write_json
        from nightshift.data.snapshot import load_snapshot
        from nightshift.evaluation import InferenceContainer, evaluate_endpoint

        image = self.require(self.image, "image", "build_inference_image")["image"]
        snap = load_snapshot(self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"])
        images, labels = snap.split("test")
        self._container = InferenceContainer(image)
        with self._container as container:
            ready_s = container.wait_ready(float(self.ready_timeout_s))
            self.log.info("%s ready at %s after %.2fs", image, container.url, ready_s)
            result = evaluate_endpoint(container.url, self.model_name, images, labels,
                                       batch_size=int(self.batch_size), class_names=snap.class_names)
            if result["errors"]:
                self.log.warning("%d request(s) failed; first: %s; container log tail:\n%s", result["errors"],
                                 result.get("error_samples"), container.logs(tail=50))
        result.update({"image": image, "ready_seconds": ready_s, "batch_size": int(self.batch_size)})
        atomic_write_json(self.run_dir(context, "system_eval") / "system_eval.json", result)
        lat = {k: (v if v is not None else float("nan")) for k, v in result["latency_ms"].items()}
        self.log.info("served accuracy %s on %d images; latency p50 %.2f / p95 %.2f / p99 %.2f ms; "
                      "%.0f images/s; %d errors", result["accuracy"], result["n"], lat["p50"], lat["p95"],
                      lat["p99"], result["throughput_ips"] or 0.0, result["errors"])
        return result

    def on_kill(self) -> None:
        if self._container is not None:
            self._container.stop()
