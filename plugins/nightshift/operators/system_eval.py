from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import SystemEvalReportLink


class SystemEvalOperator(NightshiftOperator):
    """Run the inference image on loopback and measure what a client would see.

    1. **Accuracy**: the whole test split through the Open Inference Protocol;
       served predictions are compared with ONNX Runtime run in process on the
       exported file (when ``export`` is given): any disagreement beyond
       ``skew_tolerance`` fails the task as *preprocessing skew*, naming
       example image indices.
    2. **Load**: ``concurrency`` clients for ``load_seconds`` seconds, binary
       protocol, one test image per request (:mod:`nightshift.loadgen`):
       p50/p95/p99, throughput, error rate; 503s from a full queue and client
       timeouts are counted separately.

    The container runs with a memory limit, every capability dropped and no new
    privileges; its log is attached to failures; it is always removed (also on
    ``on_kill``), and leftovers of dead workers are swept first. Results go to
    ``system_eval.json`` in the run folder, the metrics and a latency histogram
    PNG to the training run in MLflow (when ``training`` is given).

    The top-level ``accuracy``, ``latency_ms`` (load phase), ``errors``
    (failed requests of both phases, timeouts included) are what the promotion
    gates read.

    :param image: the ``build_inference_image`` result (XCom). (templated)
    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param export: the ``export_onnx`` result, for the skew check. (templated)
    :param training: the ``train_gpu`` result, for MLflow logging. (templated)
    :param model_name: served model name. (templated)
    :param batch_size: images per request in the accuracy phase. (templated)
    :param concurrency: clients in the load phase; 0 skips it. (templated)
    :param load_seconds: length of the load phase. (templated)
    :param request_timeout_s: a load request slower than this is a timeout. (templated)
    :param skew_tolerance: largest share of test images whose served and offline
        predictions may differ (default 0.005: a near-tie may flip with the batch
        size's numerics; preprocessing skew moves far more). (templated)
    :param mem_limit: the container's memory limit. (templated)
    :param ready_timeout_s: how long the server may take to become ready. (templated)
    """

    template_fields: Sequence[str] = ("image", "snapshot", "export", "training", "model_name", "batch_size",
                                      "concurrency", "load_seconds", "request_timeout_s", "skew_tolerance",
                                      "mem_limit", "ready_timeout_s")
    ui_color = "#b2ebf2"
    operator_extra_links = (SystemEvalReportLink(),)

    def __init__(self, *, image: Any, snapshot: Any, export: Any = None, training: Any = None,
                 model_name: str = "nightshift-classifier", batch_size: int = 32, concurrency: int = 16,
                 load_seconds: float = 5.0, request_timeout_s: float = 2.0, skew_tolerance: float = 0.005,
                 mem_limit: str = "2g", ready_timeout_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.snapshot = snapshot
        self.export = export
        self.training = training
        self.model_name = model_name
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.load_seconds = load_seconds
        self.request_timeout_s = request_timeout_s
        self.skew_tolerance = skew_tolerance
        self.mem_limit = mem_limit
        self.ready_timeout_s = ready_timeout_s
        self._container = None

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.artifacts import atomic_write_json
        from nightshift.data.snapshot import load_snapshot
        from nightshift.errors import PreprocessingSkew
        from nightshift.evaluation import (
            InferenceContainer,
            evaluate_endpoint,
            merge_evaluations,
            skew_report,
            sweep_containers,
        )
        from nightshift.loadgen import infer_request, run_load

        image = self.require(self.image, "image", "build_inference_image")["image"]
        snap = load_snapshot(self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"])
        out_dir = self.run_dir(context, "system_eval")
        owner = f"{self.dag_id}/{context['run_id']}/{self.task_id}"
        self._container = InferenceContainer(image, mem_limit=str(self.mem_limit), owner=owner)
        sweep_containers(self._container._client())
        with self._container as container:
            ready_s = container.wait_ready(float(self.ready_timeout_s))
            self.log.info("%s ready at %s after %.2fs", image, container.url, ready_s)
            parts = [evaluate_endpoint(container.url, self.model_name, images, labels,
                                       batch_size=int(self.batch_size), class_names=snap.class_names,
                                       return_predictions=True, warmup=3 if i == 0 else 0)
                     for i, (images, labels) in enumerate(snap.iter_split("test"))]  # shard by shard
            acc = merge_evaluations(parts)
            served_pred = acc.pop("predictions")
            first_images = next(snap.iter_split("test"), (None, None))[0]
            if acc["errors"]:
                self.log.warning("%d request(s) failed; first: %s; container log tail:\n%s", acc["errors"],
                                 acc.get("error_samples"), container.logs(tail=50))
            load: dict[str, Any] | None = None
            latencies: list[float] = []
            if int(self.concurrency) > 0 and first_images is not None and len(first_images):
                req = infer_request(container.url, self.model_name, first_images[:1], binary=True)
                lr = run_load(container.url, req, concurrency=int(self.concurrency),
                              duration_s=float(self.load_seconds), timeout_s=float(self.request_timeout_s))
                load, latencies = lr.summary(), lr.latencies_ms
                if load["errors"] or load["timeouts"]:
                    self.log.warning("load phase: %d errors, %d timeouts; container log tail:\n%s", load["errors"],
                                     load["timeouts"], container.logs(tail=50))
            logs_tail = container.logs(tail=200)

        skew = None
        if self.export:
            skew = skew_report(served_pred, self._offline_predictions(self.export["onnx_path"], snap.iter_split("test")))
        else:
            self.log.warning("no export given: the served-vs-in-process skew check is not run")
        if load is None and int(self.concurrency) > 0:
            self.log.warning("the load phase did not run (no test images): no latency under load is reported, "
                             "so the latency and throughput gates cannot pass")
        result: dict[str, Any] = {
            "image": image, "ready_seconds": ready_s, "n": acc["n"], "accuracy": acc["accuracy"],
            "accuracy_all": acc["accuracy_all"], "correct": acc["correct"],
            # a request refused with 503 under the evaluation's own bounded load is a failure too
            "errors": acc["errors"] + ((load["errors"] + load["timeouts"] + load["rejected_503"]) if load else 0),
            "latency_ms": load["latency_ms"] if load else (acc["latency_ms"] if int(self.concurrency) <= 0 else {}),
            "throughput_ips": (load or acc)["throughput_ips"],
            "throughput_rps": load["throughput_rps"] if load else None,
            "accuracy_phase": {k: v for k, v in acc.items() if k != "latencies"}, "load": load, "skew": skew,
        }
        atomic_write_json(out_dir / "system_eval.json", result)
        self._log_mlflow(result, latencies, out_dir)
        lat = result["latency_ms"]
        self.log.info("served accuracy %s on %d images; under load (c=%s): p50 %s / p95 %s / p99 %s ms, %s img/s, "
                      "%d errors", result["accuracy"], result["n"], self.concurrency, lat.get("p50"), lat.get("p95"),
                      lat.get("p99"), result["throughput_ips"], result["errors"])
        if skew is not None and skew["mismatch_rate"] is None:
            raise PreprocessingSkew(f"the skew check compared no images: the server answered none of the "
                                    f"{result['n']} test images; report {out_dir / 'system_eval.json'}",
                                    logs=logs_tail)
        if skew is not None and skew["mismatch_rate"] > float(self.skew_tolerance):
            raise PreprocessingSkew(
                f"preprocessing skew: the served model disagrees with ONNX Runtime in process on "
                f"{skew['mismatches']} of {skew['n']} test images ({skew['mismatch_rate']:.2%} > tolerance "
                f"{float(self.skew_tolerance):.2%}); examples (image index, served, offline): "
                f"{[(e['index'], e['served'], e['offline']) for e in skew['examples']]}; "
                f"report {out_dir / 'system_eval.json'}", logs=logs_tail)
        return result

    @staticmethod
    def _offline_predictions(onnx_path: str, shards: Any) -> Any:
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        out = [sess.run(["logits"], {name: images[i:i + 256]})[0].argmax(axis=1)
               for images, _ in shards for i in range(0, len(images), 256)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _log_mlflow(self, result: dict[str, Any], latencies: list[float], out_dir: Any) -> None:
        run_id = (self.training or {}).get("run_id") if isinstance(self.training, dict) else None
        if not run_id:
            return
        from nightshift import registry

        metrics = {"served_accuracy": result["accuracy"], "served_errors": result["errors"],
                   "served_ready_seconds": result["ready_seconds"]}
        load = result.get("load")
        if load:
            metrics.update({f"load_{k}_ms": v for k, v in load["latency_ms"].items() if v is not None})
            metrics.update({"load_throughput_rps": load["throughput_rps"], "load_error_rate": load["error_rate"],
                            "load_rejected_503": load["rejected_503"], "load_timeouts": load["timeouts"]})
        if result.get("skew"):
            metrics["skew_mismatches"] = result["skew"]["mismatches"]
        registry.log_metrics(self.mlflow, run_id, {k: float(v) for k, v in metrics.items() if v is not None})
        if latencies:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.hist(latencies, bins=60)
            for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                ax.axvline(load["latency_ms"][q], color="k", linestyle=style, label=f"{q} {load['latency_ms'][q]} ms")
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("requests")
            ax.set_title(f"{result['image']} under load (c={load['concurrency']})", fontsize=8)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / "latency_histogram.png", dpi=100)
            plt.close(fig)
        registry.log_artifacts(self.mlflow, run_id, out_dir, "system_eval")

    def on_kill(self) -> None:
        if self._container is not None:
            self._container.stop()
