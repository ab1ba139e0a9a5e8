from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink, PromotionDecisionLink


class PromoteModelOperator(NightshiftOperator):
    """Register the candidate in MLflow and move the ``champion`` alias only when
    every gate passes. The decision, its reason and each gate's numbers are
    recorded as tags on the new model version and in ``promotion.json``.

    :param snapshot: the ``collect_data`` result; recorded so drift checks can find
        the champion's training data. (templated)
    :param thresholds: ``min_accuracy``, ``max_p95_latency_ms``,
        ``served_accuracy_tolerance``, ``champion_tolerance``; any unset -> no
        promotion. (templated)
    :param fail_on_reject: fail the task when the candidate is not promoted. (templated)
    """

    template_fields: Sequence[str] = ("model_name", "snapshot", "validation", "training", "export", "image", "system_eval",
                                      "drift", "thresholds", "fail_on_reject")
    ui_color = "#ffe0b2"
    operator_extra_links = (PromotionDecisionLink(), ModelVersionLink(), NightshiftViewLink(),)

    def __init__(self, *, model_name: str = "nightshift-classifier", snapshot: Any, validation: Any, training: Any, export: Any,
                 image: Any, system_eval: Any, drift: Any = None, thresholds: dict[str, Any] | None = None,
                 fail_on_reject: bool = False, **kwargs: Any) -> None:
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

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry
        from nightshift.artifacts import atomic_write_json
        from nightshift.errors import NightshiftError
        from nightshift.gates import Evidence, decide
        from nightshift.settings import to_bool

        train = self.require(self.training, "training", "train_gpu")
        export = self.require(self.export, "export", "export_onnx")
        image = self.require(self.image, "image", "build_inference_image")
        served = self.require(self.system_eval, "system_eval", "system_eval")
        validation = self.validation or {}
        snapshot = self.require(self.snapshot, "snapshot", "collect_data")
        c = self.mlflow
        thresholds = {k: v for k, v in (self.thresholds or {}).items() if v not in ("", None)}
        drift = {k: (self.drift or {}).get(k) for k in ("status", "drift_detected", "drifted_share", "report_html")}

        existing = registry.find_candidate(c, self.model_name, train["run_id"], export["onnx_sha256"])
        if existing is not None:  # a retry: never register twice, never re-decide against ourselves
            outcome = registry.resume_candidate(c, self.model_name, existing)
            self.log.warning("v%s was already registered for this run by an earlier try: %s",
                             outcome["version"], outcome["note"])
            outcome.update({"image": image.get("image"), "gates": outcome.pop("recorded_gates"),
                            "thresholds": thresholds, "drift": drift})
            decision = None
        else:
            champion = registry.get_champion(c, self.model_name)  # RegistryError (retryable) unless "not found"
            champion_acc = None
            if champion is not None:
                acc = champion["tags"].get("nightshift.offline_accuracy")
                champion_acc = float(acc) if acc is not None else None
            evidence = Evidence(
                validation_passed=bool(validation.get("success")),
                offline_accuracy=float(train["metrics"]["test_accuracy"]),
                parity_passed=bool(export["parity"]["passed"]),
                served_accuracy=served.get("accuracy"),
                p95_latency_ms=(served.get("latency_ms") or {}).get("p95"),
                serving_errors=served.get("errors"),
                champion_accuracy=champion_acc,
                champion_version=champion["version"] if champion else None,
            )
            decision = decide(export["onnx_sha256"][:12], evidence, thresholds)
            tags = {"snapshot_uri": snapshot["snapshot_uri"], "data_digest": train.get("data_digest"),
                    "collection_id": snapshot.get("collection_id"),
                    "offline_accuracy": evidence.offline_accuracy, "served_accuracy": evidence.served_accuracy,
                    "p95_latency_ms": evidence.p95_latency_ms, "image": image.get("image"),
                    "image_id": image.get("image_id"), "onnx_sha256": export["onnx_sha256"],
                    "dag_run": context["run_id"], "drift_share": (self.drift or {}).get("drifted_share")}
            outcome = registry.register_candidate(c, self.model_name, train["run_id"], artifact_path="onnx",
                                                  tags=tags, decision=decision)
            outcome.update({"image": image.get("image"), "gates": decision.to_dict()["gates"],
                            "thresholds": thresholds, "offline_accuracy": evidence.offline_accuracy,
                            "served_accuracy": evidence.served_accuracy, "p95_latency_ms": evidence.p95_latency_ms,
                            "drift": drift})
        path = atomic_write_json(self.run_dir(context) / "promotion.json", outcome)
        if not outcome.get("reused"):  # a retry's outcome is already in the history
            from nightshift.contracts import HistoryEvent, append_history

            append_history(self.settings.artifact_root, HistoryEvent(
                model=self.model_name, action="promoted" if outcome["promoted"] else "rejected",
                version=outcome["version"], previous_champion=outcome["previous_champion"],
                champion=outcome["champion"], reason=outcome["reason"], dag_id=self.dag_id,
                run_id=context["run_id"], extra={"report": str(path)}))
        outcome["report_path"] = str(path)
        if decision is not None:
            for g in decision.gates:
                self.log.info("gate %-16s %s  %s", g.name, "PASS" if g.passed else "FAIL", g.detail)
        if outcome["promoted"]:
            self.log.info("PROMOTED %s v%s to champion (was %s)", self.model_name, outcome["version"],
                          outcome["previous_champion"])
        else:
            self.log.warning("NOT PROMOTED %s v%s: %s; champion stays %s", self.model_name, outcome["version"],
                             outcome["reason"], outcome["champion"])
            if to_bool(self.fail_on_reject):
                raise NightshiftError(f"candidate v{outcome['version']} not promoted: {outcome['reason']}")
        return outcome
