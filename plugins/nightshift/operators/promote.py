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
    :param thresholds: per-run overrides of the gate file's thresholds
        (``min_accuracy``, ``max_p95_latency_ms``, ``served_accuracy_tolerance``,
        ``champion_tolerance``, ``champion_relative_tolerance``); ``None`` values
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

    def _rescore(self, context: Any, c, champion: dict[str, Any] | None, export: dict[str, Any],
                 snapshot: dict[str, Any]) -> dict[str, Any]:
        """Candidate and champion ONNX models on exactly today's test split (TFX Evaluator style).

        A champion that cannot be scored (no ONNX artifact, another input shape) is
        reported as the reason its gate fails; registry outages raise (retry)."""
        from nightshift.data.snapshot import load_snapshot
        from nightshift.scoring import ScoringError, fetch_model_onnx, score_onnx

        snap = load_snapshot(snapshot["snapshot_uri"])
        out: dict[str, Any] = {"n": snap.count("test")}
        out["candidate"] = score_onnx(export["onnx_path"], snap.iter_split("test"),
                                      class_names=snap.class_names)["accuracy"]
        if champion is None:
            return out
        try:
            path = fetch_model_onnx(c, self.model_name, champion["version"], self.run_dir(context, "champion"))
            out["champion"] = score_onnx(path, snap.iter_split("test"), class_names=snap.class_names)["accuracy"]
        except ScoringError as exc:
            out["champion_error"] = str(exc)
            self.log.warning("champion v%s cannot be re-scored on today's test split: %s", champion["version"], exc)
        self.log.info("same test split (%d images): candidate %.4f, champion v%s %s", out["n"], out["candidate"],
                      champion["version"], out.get("champion", out.get("champion_error")))
        return out

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry
        from nightshift.artifacts import atomic_write_json
        from nightshift.errors import ConfigError, NightshiftError
        from nightshift.gates import Evidence, decide
        from nightshift.settings import to_bool

        train = self.require(self.training, "training", "train_gpu")
        export = self.require(self.export, "export", "export_onnx")
        image = self.require(self.image, "image", "build_inference_image")
        served = self.require(self.system_eval, "system_eval", "system_eval")
        validation = self.validation or {}
        snapshot = self.require(self.snapshot, "snapshot", "collect_data")
        c = self.mlflow
        from nightshift.gates import load_thresholds, loosened_by_overrides, read_gate_file

        gates_file = str(self.settings.gates_file) if self.gates_file is None else (self.gates_file or None)
        policy = read_gate_file(gates_file)
        thresholds, origin = load_thresholds(gates_file, self.thresholds, policy=policy)
        try:
            loosened = loosened_by_overrides(gates_file, self.thresholds, policy=policy)
        except ValueError as exc:
            raise ConfigError(f"promote: {exc}") from None
        require_approval = to_bool(self.require_approval) or bool(loosened)
        if loosened:
            self.log.warning("this run loosens the gate file (%s): a BLESSED candidate waits for approval",
                             "; ".join(loosened))
        drift = {k: (self.drift or {}).get(k) for k in ("status", "drift_detected", "drifted_share", "report_html")}

        existing = registry.find_candidate(c, self.model_name, train["run_id"], export["onnx_sha256"])
        if existing is not None:  # a retry: never register twice, never re-decide against ourselves
            outcome = registry.resume_candidate(c, self.model_name, existing)
            self.log.warning("v%s was already registered for this run by an earlier try: %s",
                             outcome["version"], outcome["note"])
            outcome.update({"image": image.get("image"), "gates": outcome.pop("recorded_gates"),
                            "thresholds": thresholds, "drift": drift, "loosened_thresholds": loosened})
            decision = None
        else:
            champion = registry.get_champion(c, self.model_name)  # RegistryError (retryable) unless "not found"
            scores = self._rescore(context, c, champion, export, snapshot)
            evidence = Evidence(
                validation_passed=bool(validation.get("success")),
                offline_accuracy=served_model_accuracy(train, export),
                parity_passed=bool(export["parity"]["passed"]),
                served_accuracy=served.get("accuracy"),
                p95_latency_ms=(served.get("latency_ms") or {}).get("p95"),
                p99_latency_ms=(served.get("latency_ms") or {}).get("p99"),
                throughput_rps=served.get("throughput_rps"),
                serving_errors=served.get("errors"),
                champion_accuracy=scores.get("champion"),
                champion_version=champion["version"] if champion else None,
                candidate_accuracy_same_split=scores.get("candidate"),
                champion_error=scores.get("champion_error"),
            )
            decision = decide(export["onnx_sha256"][:12], evidence, thresholds)
            tags = {"snapshot_uri": snapshot["snapshot_uri"], "data_digest": train.get("data_digest"),
                    "collection_id": snapshot.get("collection_id"),
                    "offline_accuracy": evidence.offline_accuracy, "served_accuracy": evidence.served_accuracy,
                    "p95_latency_ms": evidence.p95_latency_ms, "image": image.get("image"),
                    "image_id": image.get("image_id"), "onnx_sha256": export["onnx_sha256"],
                    "dag_run": context["run_id"], "drift_share": (self.drift or {}).get("drifted_share")}
            outcome = registry.register_candidate(c, self.model_name, train["run_id"], artifact_path="onnx",
                                                  tags=tags, decision=decision,
                                                  require_approval=require_approval)
            outcome.update({"image": image.get("image"), "gates": decision.to_dict()["gates"],
                            "thresholds": thresholds, "offline_accuracy": evidence.offline_accuracy,
                            "served_accuracy": evidence.served_accuracy, "p95_latency_ms": evidence.p95_latency_ms,
                            "drift": drift, "threshold_origin": origin, "loosened_thresholds": loosened,
                            "same_split_scores": {
                                k: v for k, v in scores.items() if k != "predictions"}})
        path = atomic_write_json(self.run_dir(context) / "promotion.json", outcome)
        if not outcome.get("reused"):  # a retry's outcome is already in the history
            from nightshift.contracts import HistoryEvent, append_history

            append_history(self.settings.artifact_root, HistoryEvent(
                model=self.model_name,
                action="promoted" if outcome["promoted"] else
                ("awaiting_approval" if outcome.get("awaiting_approval") else "rejected"),
                version=outcome["version"], previous_champion=outcome["previous_champion"],
                champion=outcome["champion"], reason=outcome["reason"], dag_id=self.dag_id,
                run_id=context["run_id"], extra={"report": str(path)}))
        outcome["report_path"] = str(path)
        if decision is not None:
            for g in decision.gates:
                self.log.info("gate %-16s %s  %s", g.name, "PASS" if g.passed else "FAIL", g.detail)
        if outcome.get("awaiting_approval"):
            self.log.warning("BLESSED %s v%s: waiting for approval before champion moves (task approve_promotion)",
                             self.model_name, outcome["version"])
        elif outcome["promoted"]:
            self.log.info("PROMOTED %s v%s to champion (was %s)", self.model_name, outcome["version"],
                          outcome["previous_champion"])
        else:
            self.log.warning("NOT PROMOTED %s v%s: %s; champion stays %s", self.model_name, outcome["version"],
                             outcome["reason"], outcome["champion"])
            if to_bool(self.fail_on_reject):
                raise NightshiftError(f"candidate v{outcome['version']} not promoted: {outcome['reason']}")
        return outcome


def served_model_accuracy(train: dict[str, Any], export: dict[str, Any]) -> float:
    """Offline test accuracy of the model the image serves: the int8 model's (ONNX Runtime, test
    split) when export kept one, else the trained model's. The accuracy floor and the
    served-vs-offline skew gate then judge what is served, not the fp32 model it came from."""
    q = export.get("quantization") or {}
    if export.get("variant") == "int8" and q.get("kept") and q.get("int8_accuracy") is not None:
        return float(q["int8_accuracy"])
    return float(train["metrics"]["test_accuracy"])
