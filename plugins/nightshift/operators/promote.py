from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink, PromotionDecisionLink
from nightshift.promotion import served_model_accuracy  # noqa: F401 - moved there; kept importable here


class PromoteModelOperator(NightshiftOperator):
    """Register the candidate in MLflow and move the ``champion`` alias only when
    every gate passes. The decision, its reason and each gate's numbers are
    recorded as tags on the new model version and in ``promotion.json``.

    The decision itself is :func:`nightshift.promotion.promote_candidate` (no Airflow):
    this operator resolves its templates, calls it and pushes the outcome. A run
    whose data (source, classes, partition window) differs from the champion's
    waits for approval like a loosened threshold does.

    :param snapshot: the ``collect_data`` result; recorded so drift checks can find
        the champion's training data. (templated)
    :param thresholds: per-run overrides of the gate file's thresholds
        (``min_accuracy``, ``max_p95_latency_ms``, ``served_accuracy_tolerance``,
        ``champion_tolerance``, ``champion_relative_tolerance``, ``min_test_images``,
        ``champion_alpha``, ...: :data:`nightshift.gates.THRESHOLD_KEYS`); ``None`` values
        do not override. Any threshold unset in both -> no promotion. An override
        looser than the gate file (a lower floor, a larger budget or tolerance, or
        a threshold the file leaves unset) makes a BLESSED candidate wait for
        approval, as ``require_approval`` does. (templated)
    :param require_approval: a BLESSED candidate waits for a person (the
        ``approve_promotion`` HITL task) before ``champion`` moves. (templated)
    :param gates_file: YAML file with ``thresholds:``; default ``include/gates.yaml``
        (``$NIGHTSHIFT_GATES_FILE``). ``""`` reads no file. (templated)
    :param fail_on_reject: fail the task when the candidate is not promoted. (templated)
    """

    template_fields: Sequence[str] = ("model_name", "snapshot", "validation", "training", "export", "image", "system_eval",
                                      "drift", "thresholds", "fail_on_reject", "gates_file", "require_approval")
    #: Nothing of the run folder by path, and of its upstream results only the candidate's ONNX file
    #: (fetched in ``execute``): the other results are read as values, so their files (the training
    #: folder with its resume checkpoint, the export's model folder, the drift and validation reports)
    #: stay where they are and are recorded by their URIs.
    run_folder_reads: Sequence[str] = ()
    store_inputs: Sequence[str] = ()
    ui_color = "#ffe0b2"
    operator_extra_links = (PromotionDecisionLink(), ModelVersionLink(), NightshiftViewLink(),)

    def __init__(self, *, model_name: str = "nightshift-classifier", snapshot: Any, validation: Any, training: Any, export: Any,
                 image: Any, system_eval: Any, drift: Any = None, thresholds: dict[str, Any] | None = None,
                 fail_on_reject: bool = False, gates_file: str | None = None, require_approval: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.snapshot = snapshot
        self.validation = validation
        self.training = training
        self.export = export
        self.image = image
        self.system_eval = system_eval
        self.drift = drift
        self.thresholds = thresholds
        self.fail_on_reject = fail_on_reject
        self.gates_file = gates_file
        self.require_approval = require_approval

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.errors import ConfigError, NightshiftError
        from nightshift.promotion import promote_candidate
        from nightshift.settings import to_bool

        train = self.require(self.training, "training", "train_gpu")
        export = dict(self.require(self.export, "export", "export_onnx"))
        if not export.get("onnx_path"):
            raise ConfigError(f"export names no onnx_path (keys: {sorted(export)}): expected the result of the "
                              "'export_onnx' task (XCom)")
        image = self.require(self.image, "image", "build_inference_image")
        served = self.require(self.system_eval, "system_eval", "system_eval")
        snapshot = self.require(self.snapshot, "snapshot", "collect_data")
        export["onnx_path"] = str(self.fetch_input(export["onnx_path"]))  # the candidate, re-scored here
        gates_file = str(self.settings.gates_file) if self.gates_file is None else (self.gates_file or None)
        outcome = promote_candidate(
            self.mlflow, model_name=self.model_name, snapshot=snapshot, training=train, export=export, image=image,
            system_eval=served, drift=self.drift, validation=self.validation, overrides=self.thresholds,
            gates_file=gates_file, require_approval=self.require_approval, run_id=context["run_id"],
            dag_id=self.dag_id, run_dir=self.run_dir(context), artifact_root=self.store,
            logger=self.log)
        if outcome.get("awaiting_approval"):
            self.log.warning("BLESSED %s v%s: waiting for approval before champion moves (task approve_promotion): %s",
                             self.model_name, outcome["version"], "; ".join(outcome.get("approval_reasons") or [])
                             or "require_approval is on")
        elif outcome["promoted"]:
            self.log.info("PROMOTED %s v%s to champion (was %s)", self.model_name, outcome["version"],
                          outcome["previous_champion"])
        else:
            self.log.warning("NOT PROMOTED %s v%s: %s; champion stays %s", self.model_name, outcome["version"],
                             outcome["reason"], outcome["champion"])
            if to_bool(self.fail_on_reject):
                raise NightshiftError(f"candidate v{outcome['version']} not promoted: {outcome['reason']}")
        return outcome
