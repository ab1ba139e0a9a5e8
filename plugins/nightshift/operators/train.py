from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import MLflowRunLink

if TYPE_CHECKING:
    from nightshift.placement import TrainPlacement


class TrainGPUOperator(NightshiftOperator):
    """Train the classifier on a snapshot: CUDA when present, else CPU.

    Params and per-epoch metrics go to MLflow; the checkpoint, a run manifest
    (versions, seed, data digest, device) and plots (training curves, confusion
    matrix) go to the run's artifact folder and to the MLflow run, the snapshot
    is recorded as the run's dataset input (:mod:`nightshift.train_run`).

    Where it runs is the DAG's business (``queue``, ``executor_config``: see
    :func:`train_task`); :class:`~nightshift.operators.train_pod.TrainGPUPodOperator`
    runs the same training in a pod of its own.

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
        from nightshift.settings import to_bool
        from nightshift.train_run import run_training

        snap_info = self.require(self.snapshot, "snapshot", "collect_data")
        return run_training(
            self.mlflow, snap_info["snapshot_uri"], self.run_dir(context, "train"), self.hparams,
            model_name=self.model_name, run_name=f"{context['run_id']}", require_gpu=to_bool(self.require_gpu),
            tags={"nightshift.dag_id": self.dag_id, "nightshift.run_id": context["run_id"],
                  "nightshift.task": self.task_id},
            artifact_location=(self.settings.home / "mlartifacts").as_uri(),
            should_stop=lambda: self._stop, log=self.log,
        )

    def on_kill(self) -> None:
        self._stop = True


def train_task(placement: "TrainPlacement", **common: Any) -> Any:
    """The ``train_gpu`` task placed as configured (:class:`nightshift.placement.TrainPlacement`).

    ``local``/``celery``/``kubernetes_executor`` give a :class:`TrainGPUOperator` with the
    placement's ``queue``, ``executor`` and GPU ``executor_config``; ``kubernetes_pod`` gives a
    :class:`~nightshift.operators.train_pod.TrainGPUPodOperator` (imported only then: the
    provider's pod operator is slow to import). Both take the same ``common`` arguments
    (``task_id``, ``snapshot``, ``hparams``, ``require_gpu``, ``model_name``, ``pool`` ...) and
    push the same XCom.
    """
    if placement.kind == "kubernetes_pod":
        from nightshift.operators.train_pod import TrainGPUPodOperator

        extra = {"executor": placement.executor} if placement.executor else {}
        return TrainGPUPodOperator(image=placement.image, gpus=placement.gpus, node_selector=placement.node_selector,
                                   tolerations=placement.tolerations, memory=placement.memory, cpu=placement.cpu,
                                   artifact_pvc=placement.artifact_pvc, namespace=placement.namespace,
                                   **extra, **common)
    return TrainGPUOperator(**placement.operator_kwargs(), **common)
