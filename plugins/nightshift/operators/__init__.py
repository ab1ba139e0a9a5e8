"""Airflow operators for Nightshift. Thin: resolve config, call the core, push small JSON.

Importing this package is cheap (no torch, onnxruntime, GX, Evidently, MLflow or
docker): the heavy libraries are imported inside ``execute``.
``TrainGPUPodOperator`` is imported on first use only: it subclasses the
cncf-kubernetes provider's pod operator, which takes seconds to import. The sweep
operators (``nightshift.operators.sweep``) too: a DAG without a sweep never loads them.
"""

from nightshift.operators.assets import DRIFT_DETECTED_ASSET, SNAPSHOT_ASSET
from nightshift.operators.links import MLflowRunLink
from nightshift.operators.champion import SetChampionOperator
from nightshift.operators.collect import CollectDataOperator
from nightshift.operators.deploy import DeployModelOperator
from nightshift.operators.drift import DriftCheckOperator
from nightshift.operators.export import ExportONNXOperator
from nightshift.operators.image import BuildInferenceImageOperator
from nightshift.operators.monitor import DriftMonitorOperator
from nightshift.operators.approval import FinalizePromotionOperator, PromotionApprovalOperator
from nightshift.operators.promote import PromoteModelOperator
from nightshift.operators.system_eval import SystemEvalOperator
from nightshift.operators.train import TrainGPUOperator, train_task
from nightshift.operators.validate import ValidateDataOperator

__all__ = [
    "DRIFT_DETECTED_ASSET",
    "SNAPSHOT_ASSET",
    "BuildInferenceImageOperator",
    "CollectDataOperator",
    "DeployModelOperator",
    "DriftCheckOperator",
    "DriftMonitorOperator",
    "ExportONNXOperator",
    "FinalizePromotionOperator",
    "PromoteModelOperator",
    "PromotionApprovalOperator",
    "SetChampionOperator",
    "SystemEvalOperator",
    "TrainGPUOperator",
    "train_task",
    "ValidateDataOperator",
]


_SWEEP = ("SelectTrialOperator", "SweepTrialOperator", "SweepTrialsOperator", "sweep_train")


def __getattr__(name: str):
    if name == "TrainGPUPodOperator":
        from nightshift.operators.train_pod import TrainGPUPodOperator

        return TrainGPUPodOperator
    if name in _SWEEP:
        from nightshift.operators import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Operators this package does not import up front, with the links they list: the plugin registers
#: those links for them by name and module (what Airflow matches on) without importing the provider.
#: tests/ui/test_links.py checks each entry against the real class.
LAZY_OPERATOR_LINKS = {
    ("nightshift.operators.train_pod", "TrainGPUPodOperator"): (MLflowRunLink,),
    ("nightshift.operators.sweep", "SweepTrialOperator"): (MLflowRunLink,),
    ("nightshift.operators.sweep", "SelectTrialOperator"): (MLflowRunLink,),
}
