from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import SystemEvalReportLink


class SystemEvalOperator(NightshiftOperator):
    """Run the inference image on loopback as it will serve and measure what a client would see:
    :func:`nightshift.system_eval.run_system_eval` (accuracy and preprocessing skew over the
    test split, latency and throughput under ``concurrency`` clients).

    The container starts the way ``deploy`` starts the champion
    (:func:`nightshift.containers.serving_run_kwargs` with ``ServingConfig.from_env()``):
    the request log on at the deployed sampling rate, the same memory and process limits
    and environment, so the latency and throughput gates measure the deployed
    configuration. It is always removed (also on ``on_kill``); leftovers of dead workers
    are swept first. Results go to ``system_eval.json`` in the run folder; the metrics
    and the latency histogram to the training run in MLflow (when ``training`` is given).

    The top-level ``accuracy``, ``latency_ms`` (load phase), ``errors`` (failed requests
    of both phases, timeouts included) and ``throughput_rps`` are what the promotion gates read.

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
    :param ready_timeout_s: how long the server may take to become ready. (templated)
    :param docker_conn_id: the Airflow connection of the Docker daemon (see
        :func:`nightshift.operators.base.resolve_docker_client`); ``None``:
        ``$NIGHTSHIFT_DOCKER_CONN_ID`` where the task runs, else ``DOCKER_HOST``. (templated)
    """

    template_fields: Sequence[str] = ("image", "snapshot", "export", "training", "model_name", "batch_size",
                                      "concurrency", "load_seconds", "request_timeout_s", "skew_tolerance",
                                      "ready_timeout_s", "docker_conn_id")
    #: what of the run folder it reads (fetched first on an object store): its own folder
    run_folder_reads: Sequence[str] = ("system_eval",)
    ui_color = "#b2ebf2"
    operator_extra_links = (SystemEvalReportLink(),)

    def __init__(self, *, image: Any, snapshot: Any, export: Any = None, training: Any = None,
                 model_name: str = "nightshift-classifier", batch_size: int = 32, concurrency: int = 16,
                 load_seconds: float = 5.0, request_timeout_s: float = 2.0, skew_tolerance: float = 0.005,
                 ready_timeout_s: float = 60.0, docker_conn_id: str | None = None, **kwargs: Any) -> None:
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
        self.ready_timeout_s = ready_timeout_s
        self.docker_conn_id = docker_conn_id
        self._container = None

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.containers import ServingConfig
        from nightshift.data.snapshot import fetch_snapshot, load_snapshot
        from nightshift.system_eval import run_system_eval

        image = self.require(self.image, "image", "build_inference_image")["image"]
        snapshot_uri = self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"]
        snap = load_snapshot(fetch_snapshot(self.store, snapshot_uri))
        onnx_path = None
        if self.export:  # given: the skew check must run (no onnx_path is an upstream fault)
            onnx_path = self.require(self.export.get("onnx_path") if isinstance(self.export, dict) else None,
                                     "export['onnx_path']", "export_onnx")
        return run_system_eval(
            image, snap, model_name=self.model_name, out_dir=self.run_dir(context, "system_eval"),
            onnx_path=onnx_path, config=ServingConfig.from_env(), docker_client=self.docker_client(),
            batch_size=int(self.batch_size),
            concurrency=int(self.concurrency), load_seconds=float(self.load_seconds),
            request_timeout_s=float(self.request_timeout_s), skew_tolerance=float(self.skew_tolerance),
            ready_timeout_s=float(self.ready_timeout_s), owner=f"{self.dag_id}/{context['run_id']}/{self.task_id}",
            on_container=self._keep_container, on_report=self._log_mlflow)

    def _keep_container(self, container: Any) -> None:
        self._container = container

    def _log_mlflow(self, result: dict[str, Any], out_dir: Any) -> None:
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
        for key in ("records", "dropped"):
            metrics[f"request_log_{key}"] = (result.get("request_log") or {}).get(key)
        registry.log_metrics(self.mlflow, run_id, {k: float(v) for k, v in metrics.items() if v is not None})
        registry.log_artifacts(self.mlflow, run_id, out_dir, "system_eval", exclude=("requests",))

    def on_kill(self) -> None:
        if self._container is not None:
            self._container.stop()
