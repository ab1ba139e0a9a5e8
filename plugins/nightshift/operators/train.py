from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import MLflowRunLink


class TrainGPUOperator(NightshiftOperator):
    """Train the classifier on a snapshot: CUDA when present, else CPU.

    Params and per-epoch metrics go to MLflow; the checkpoint and a run manifest
    (versions, seed, data digest, device) go to the run's artifact folder and to
    the MLflow run.

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param hparams: overrides of ``nightshift.training.DEFAULT_HPARAMS``
        (``epochs``, ``model``, ``lr`` ...). (templated)
    :param require_gpu: fail instead of falling back to CPU when no GPU is visible. (templated)
    :param model_name: registered model name; also the MLflow experiment name. (templated)
    """

    template_fields: Sequence[str] = ("snapshot", "hparams", "require_gpu", "model_name")
    ui_color = "#c8e6c9"
    operator_extra_links = (MLflowRunLink(),)

    def __init__(self, *, snapshot: Any, hparams: dict[str, Any] | None = None, require_gpu: bool = False,
                 model_name: str = "nightshift-classifier", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.hparams = hparams
        self.require_gpu = require_gpu
        self.model_name = model_name
        self._stop = False

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry, training
        from nightshift.data.snapshot import load_snapshot
        from nightshift.settings import to_bool

        snap_info = self.require(self.snapshot, "snapshot", "collect_data")
        snap = load_snapshot(snap_info["snapshot_uri"])
        hp = training.resolve_hparams(dict(self.hparams or {}), snap.image_shape)  # None -> by input size
        require_gpu = to_bool(self.require_gpu)
        training.select_device(require_gpu)  # fail fast, before an MLflow run is opened
        out_dir = self.run_dir(context, "train")
        c = self.mlflow
        tags = {"nightshift.dag_id": self.dag_id, "nightshift.run_id": context["run_id"],
                "nightshift.data_digest": snap.digest, "nightshift.task": self.task_id}
        with registry.training_run(c, self.model_name, f"{context['run_id']}", tags=tags, params=hp,
                                   artifact_location=(self.settings.home / "mlartifacts").as_uri()) as run_id:
            def on_epoch(epoch: int, m: dict[str, float]) -> None:
                self.log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
                registry.log_metrics(c, run_id, m, step=epoch)

            result = training.train(snap, out_dir, hp, require_gpu=require_gpu, on_epoch=on_epoch,
                                    should_stop=lambda: self._stop)
            per_epoch = set(result.history[-1])
            registry.log_metrics(c, run_id, {k: v for k, v in result.metrics.items() if k not in per_epoch},
                                 step=hp["epochs"])
            c.set_tag(run_id, "nightshift.device", result.manifest["device"])
            registry.log_artifacts(c, run_id, out_dir, "train")
        self.log.info("Trained on %s: test accuracy %.4f (%s)", result.manifest["device"],
                      result.metrics["test_accuracy"], run_id)
        return {"run_id": run_id, "checkpoint": str(result.checkpoint_path), "metrics": result.metrics,
                "device": result.manifest["device"], "train_dir": str(out_dir), "data_digest": snap.digest}

    def on_kill(self) -> None:
        self._stop = True
