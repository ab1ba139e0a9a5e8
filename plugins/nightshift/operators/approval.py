from __future__ import annotations

from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param


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
