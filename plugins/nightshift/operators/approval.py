from __future__ import annotations

from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param

from nightshift.operators.base import NightshiftOperator


class PromotionApprovalOperator(ApprovalOperator):
    """Airflow's Human-in-the-loop approval of a BLESSED candidate, asked only when
    the promote step says it is waiting for one (``require_approval``); skipped
    otherwise. The approver and their comment are recorded on the model version
    by ``finalize_promotion``.

    :param promotion: the ``promote`` result (XCom). (templated)
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "promotion")

    def __init__(self, *, promotion: Any, **kwargs: Any) -> None:
        from datetime import timedelta

        if "Approve" in (kwargs.get("defaults") or []):
            raise ValueError("PromotionApprovalOperator must not approve by default: an unanswered request "
                             "would promote without a person")
        kwargs.setdefault("subject", "Promote {{ params.model_name }} to champion?")
        # unanswered for a week: the task fails, nothing is promoted and later runs are not held back forever
        kwargs.setdefault("response_timeout", timedelta(days=7))
        kwargs.setdefault("params", {"comment": Param("", type="string", title="Comment (recorded)")})
        super().__init__(**kwargs)
        self.promotion = promotion

    def execute(self, context: Any):
        from airflow.sdk.exceptions import AirflowSkipException

        p = self.promotion or {}
        if not p.get("awaiting_approval"):
            raise AirflowSkipException("no approval needed (require_approval is off, or the candidate was not blessed)")
        gates = "\n".join(f"- {'PASS' if g.get('passed') else 'FAIL'} **{g.get('name')}**: {g.get('detail', '')}"
                          for g in p.get("gates", []))
        loosened = "".join(f"\n- {why}" for why in p.get("loosened_thresholds") or [])
        if loosened:
            loosened = f"\n\nThis run loosened the gate file, so a person decides:{loosened}"
        self.body = (f"Candidate **v{p.get('version')}** passed every gate against champion "
                     f"v{p.get('previous_champion')}.\n\n{gates}{loosened}\n\nImage `{p.get('image')}`. "
                     "Approve to move `champion` and deploy; Reject to keep the current champion.")
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The answer, Approve or Reject, goes to ``finalize_promotion``, which records it on the
        model version (ApprovalOperator would skip the downstream task on Reject, and the
        rejection would never be recorded)."""
        from airflow.providers.standard.operators.hitl import HITLOperator

        return HITLOperator.execute_complete(self, context, event)


class FinalizePromotionOperator(NightshiftOperator):
    """After the optional approval: move ``champion`` for an approved candidate and
    record who approved and why; otherwise pass the promotion outcome through.

    :param promotion: the ``promote`` result (XCom). (templated)
    :param approval: the ``approve_promotion`` result (XCom; none when it was skipped). (templated)
    :param model_name: registered model. (templated)
    """

    template_fields: Sequence[str] = ("promotion", "approval", "model_name")
    ui_color = "#ffe0b2"

    def __init__(self, *, promotion: Any, approval: Any = None, model_name: str, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "none_failed")  # runs when approval was skipped (not needed)
        super().__init__(**kwargs)
        self.promotion = promotion
        self.approval = approval
        self.model_name = model_name

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import contracts, registry
        from nightshift.artifacts import atomic_write_json
        from nightshift.errors import ConfigError

        outcome = dict(self.require(self.promotion, "promotion", "promote"))
        if not outcome.get("awaiting_approval"):
            return outcome
        answer = self.approval or {}
        chosen = answer.get("chosen_options") or []
        if not chosen:
            raise ConfigError(f"v{outcome['version']} awaits approval but approve_promotion gave no answer")
        approved = chosen[0] == "Approve"
        who = answer.get("responded_by_user") or {}
        actor = (who.get("name") or who.get("id") if isinstance(who, dict) else str(who)) or "unknown"
        comment = str((answer.get("params_input") or {}).get("comment") or "")
        res = registry.approve_candidate(self.mlflow, self.model_name, outcome["version"], approved=approved,
                                         actor=actor, comment=comment,
                                         expected_champion=outcome.get("previous_champion"))
        outcome.update({"promoted": res["promoted"], "champion": res["champion"], "awaiting_approval": False,
                        "approved_by": actor, "approval_comment": comment, "approved": approved, "note": res["note"]})
        # the run's report (and so its run note) says what the person decided, not "waiting"
        outcome["report_path"] = str(atomic_write_json(self.run_dir(context) / "promotion.json",
                                                       {k: v for k, v in outcome.items() if k != "report_path"}))
        contracts.append_history(self.settings.artifact_root, contracts.HistoryEvent(
            model=self.model_name, action="promoted" if res["promoted"] else "approval_rejected",
            version=outcome["version"], previous_champion=outcome.get("previous_champion"),
            champion=res["champion"], reason=f"{res['note']}", actor=actor, dag_id=self.dag_id,
            run_id=context["run_id"]))
        self.log.warning("%s", res["note"])
        return outcome
