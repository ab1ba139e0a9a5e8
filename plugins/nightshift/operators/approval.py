"""The optional human approval of a BLESSED candidate, and what follows it.

``approve_promotion`` asks a person (Airflow's Human-in-the-loop request) and
waits on :class:`SupersedableHITLTrigger` instead of Airflow 3.3's
``awaiting_input`` park: the wait ends with the person's answer, at the
timeout, or as soon as a newer candidate of the same model is registered
(:func:`nightshift.approvals.superseding_version`), so a question about an old
candidate never holds back newer runs (``nightly_retrain`` lets runs overlap).
``finalize_promotion`` records the outcome (:func:`nightshift.approvals.finalize_approval`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.triggers.hitl import HITLTrigger
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict
from airflow.triggers.base import TriggerEvent

from nightshift.contracts import PROMOTION_FILE
from nightshift.operators.base import NightshiftOperator


def runs_in_dag_test() -> bool:
    """Whether this task runs inside ``dag.test()`` / ``airflow dags test``: tasks and their
    triggers run in this process, through a supervisor whose trigger runner cannot read a
    Human-in-the-loop answer (Airflow 3.3.2 answers ``GetHITLDetailResponse`` only in the
    triggerer), and there is no scheduler whose other runs a wait could hold back."""
    try:
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms
    except ImportError:  # pragma: no cover - another Task SDK layout
        return False
    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), InProcessSupervisorComms)


class SupersedableHITLTrigger(HITLTrigger):
    """:class:`HITLTrigger` (the person's answer, or the timeout) that also ends when a newer
    candidate of ``model_name`` supersedes ``version``.

    Besides the Human-in-the-loop response (every ``poke_interval`` seconds), it asks the model
    registry every ``supersede_interval`` seconds for a version registered after ``version``
    with a recorded promotion decision. When there is one, it closes the request (the
    answer ``Reject``, by nobody, with a comment naming the newer version, so the Required
    Actions page no longer offers it) and yields ``{"superseded_by": <version>, ...}``. A
    registry that cannot be read is logged and asked again: the wait goes on.

    :param model_name: registered model of the waiting candidate.
    :param version: the waiting candidate's version.
    :param supersede_interval: seconds between two questions to the registry.
    :param dag_id, task_id, run_id: the waiting task, for the log lines.
    """

    def __init__(self, *, model_name: str, version: str, supersede_interval: float = 60.0, dag_id: str = "",
                 task_id: str = "", run_id: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.version = str(version)
        self.supersede_interval = float(supersede_interval)
        self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
        self._client = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {**kwargs, "model_name": self.model_name, "version": self.version,
                 "supersede_interval": self.supersede_interval, "dag_id": self.dag_id, "task_id": self.task_id,
                 "run_id": self.run_id})

    def _superseding_version(self) -> dict[str, Any] | None:
        """Blocking (run in a thread): the registry's newer candidate, if any."""
        from nightshift import approvals, registry
        from nightshift.settings import Settings

        if self._client is None:
            s = Settings.from_env()
            self._client = registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri)
        return approvals.superseding_version(self._client, self.model_name, self.version)

    async def superseded_by(self) -> dict[str, Any] | None:
        """The newer candidate, or ``None`` (also when the registry cannot be read now)."""
        try:
            return await asyncio.to_thread(self._superseding_version)
        except Exception as exc:  # noqa: BLE001 - keep waiting; the next poll asks again
            self.log.warning("cannot tell whether %s v%s is superseded (%s: %s); still waiting for the answer",
                             self.model_name, self.version, type(exc).__name__, exc)
            return None

    async def _close_request(self, newer: dict[str, Any]) -> TriggerEvent:
        from asgiref.sync import sync_to_async
        from airflow.sdk.execution_time.hitl import update_hitl_detail_response
        from airflow.sdk.timezone import utcnow

        from nightshift import approvals

        comment = (f"superseded by the newer candidate {approvals.describe(newer)} of {self.model_name}: "
                   f"v{self.version} is no longer asked about")
        params = self.params.dump()
        params_input = {k: (comment if k == "comment" else v) for k, v in params.items()}
        responded_at = utcnow()
        try:
            resp = await sync_to_async(update_hitl_detail_response)(
                ti_id=self.ti_id, chosen_options=[approvals.REJECT], params_input=params_input)
            responded_at = resp.responded_at or responded_at
        except Exception as exc:  # noqa: BLE001 - e.g. a person answered a moment ago (409)
            answered = await self._handle_response()
            if answered is not None:
                self.log.info("[HITL] answered just before v%s superseded it; finalize_promotion decides",
                              newer["version"])
                return answered
            self.log.warning("could not close the request of %s v%s (%s: %s); ending the wait as superseded",
                             self.model_name, self.version, type(exc).__name__, exc)
        self.log.warning("%s of %s %s: %s v%s is superseded by %s: the wait ends, nothing is promoted",
                         self.task_id, self.dag_id, self.run_id, self.model_name, self.version,
                         approvals.describe(newer))
        return TriggerEvent({"superseded_by": str(newer["version"]), "superseded_decision": newer.get("decision"),
                             "chosen_options": [approvals.REJECT], "params_input": params_input,
                             "responded_at": responded_at, "responded_by_user": None, "timedout": False})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Until the answer, the timeout or a newer candidate, whichever comes first."""
        from airflow.sdk.timezone import utcnow

        # the words Airflow uses for a parked Human-in-the-loop task (dag.test(), scripts/progress.py)
        self.log.info("Waiting for Human-in-the-loop input for tasks: [%r] (%s %s: %s v%s; the wait ends early "
                      "when a newer candidate of %s is registered)", self.task_id, self.dag_id, self.run_id,
                      self.model_name, self.version, self.model_name)
        next_check = 0.0
        while True:
            if self.timeout_datetime and self.timeout_datetime < utcnow():
                yield await self._handle_timeout()
                return
            event = await self._handle_response()
            if event:
                yield event
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.supersede_interval
                newer = await self.superseded_by()
                if newer is not None:
                    yield await self._close_request(newer)
                    return
            await asyncio.sleep(self.poke_interval)


class PromotionApprovalOperator(ApprovalOperator):
    """Airflow's Human-in-the-loop approval of a BLESSED candidate, asked only when
    the promote step says it is waiting for one (``require_approval``); skipped
    otherwise. The approver and their comment are recorded on the model version
    by ``finalize_promotion``.

    The task waits on :class:`SupersedableHITLTrigger` (deferred, on the triggerer),
    not in Airflow 3.3's ``awaiting_input`` park, which only a person or the timeout
    can end: here a newer candidate of the same model ends the wait too, and the
    answer handed to ``finalize_promotion`` says ``superseded_by``. A person's answer
    through the UI, the REST API or ``scripts/approve.py`` resumes the task at once,
    as before. Under ``airflow dags test`` (no triggerer, see :func:`runs_in_dag_test`)
    it parks in ``awaiting_input`` as HITLOperator does.

    :param promotion: the ``promote`` result (XCom). (templated)
    :param model_name: registered model; default the promotion's ``model_name``. (templated)
    :param supersede_interval: seconds between two looks at the registry for a newer candidate.
    :param poke_interval: seconds between two looks for the person's answer.
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "promotion", "model_name")

    def __init__(self, *, promotion: Any, model_name: str | None = None, supersede_interval: float = 60.0,
                 poke_interval: float = 5.0, **kwargs: Any) -> None:
        from datetime import timedelta

        if "Approve" in (kwargs.get("defaults") or []):
            raise ValueError("PromotionApprovalOperator must not approve by default: an unanswered request "
                             "would promote without a person")
        kwargs.setdefault("subject", "Promote {{ params.model_name }} to champion?")
        # unanswered for a week: the task fails and nothing is promoted (a newer candidate ends it sooner)
        kwargs.setdefault("response_timeout", timedelta(days=7))
        # the form's comment field. Inside a DAG, Airflow hands this __init__ the DAG's params (source
        # "dag", which HITLOperator drops): the field is added to them, not set only when none are given
        given = kwargs.get("params") or {}
        params = {k: given.get_param(k) for k in given} if isinstance(given, ParamsDict) else dict(given)
        params.setdefault("comment", Param("", type="string", title="Comment (recorded)", source="task"))
        kwargs["params"] = params
        super().__init__(**kwargs)
        self.promotion = promotion
        self.model_name = model_name
        self.supersede_interval = supersede_interval
        self.poke_interval = poke_interval

    def execute(self, context: Any):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskAwaitingInput, TaskDeferred

        p = self.promotion or {}
        if not p.get("awaiting_approval"):
            raise AirflowSkipException("no approval needed (require_approval is off, or the candidate was not blessed)")
        model_name = self.model_name or p.get("model_name")
        if not model_name or not p.get("version"):
            raise AirflowFailException(f"the promote result names no model and version to approve "
                                       f"(model_name={model_name!r}, version={p.get('version')!r}): nothing to ask")
        gates = "\n".join(f"- {'PASS' if g.get('passed') else 'FAIL'} **{g.get('name')}**: {g.get('detail', '')}"
                          for g in p.get("gates", []))
        # why a person decides: thresholds this run loosened, data that differs from the champion's
        loosened = "".join(f"\n- {why}" for why in p.get("loosened_thresholds") or [])
        if loosened:
            loosened = f"\n\nThis run loosened the gate file, so a person decides:{loosened}"
        changed = "".join(f"\n- {why}" for why in p.get("data_changed") or [])
        if changed:
            loosened += f"\n\nThis run's data differs from the champion's, so a person decides:{changed}"
        self.body = (f"Candidate **v{p.get('version')}** passed every gate against champion "
                     f"v{p.get('previous_champion')}.\n\n{gates}{loosened}\n\nImage `{p.get('image')}`. "
                     "Approve to move `champion` and deploy; Reject to keep the current champion. "
                     f"A newer candidate of `{model_name}` ends this request unanswered (superseded).")
        try:
            # HITLOperator writes the request and runs the notifiers, then parks the task
            # (awaiting_input on Airflow 3.3+) or defers it to its own trigger: replaced below
            super().execute(context)
        except TaskAwaitingInput:
            if runs_in_dag_test():
                # dag.test() runs triggers in line with a supervisor that cannot read the answer (Airflow
                # 3.3.2): park as HITLOperator does; an Approve that a newer candidate overtook is still
                # recorded as superseded by finalize_promotion
                self.log.info("airflow dags test: waiting in awaiting_input (no triggerer here); a newer "
                              "candidate does not end this wait, an answer does")
                raise
        except TaskDeferred:
            pass
        else:  # pragma: no cover - HITLOperator always waits
            raise AirflowFailException("HITLOperator.execute returned without waiting for the answer")
        timeout = self.hitl_summary_extra.get("timeout_datetime")
        ti = context["task_instance"]
        self.defer(
            trigger=SupersedableHITLTrigger(
                ti_id=ti.id, options=self.options, defaults=self.defaults, params=self.serialized_params,
                multiple=self.multiple, timeout_datetime=datetime.fromisoformat(timeout) if timeout else None,
                poke_interval=self.poke_interval, model_name=str(model_name), version=str(p["version"]),
                supersede_interval=self.supersede_interval, dag_id=ti.dag_id, task_id=ti.task_id,
                run_id=ti.run_id),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The answer, Approve or Reject, or ``superseded_by`` when a newer candidate ended the
        wait, goes to ``finalize_promotion``, which records it on the model version
        (ApprovalOperator would skip the downstream task on Reject, and the rejection would
        never be recorded)."""
        from airflow.providers.standard.operators.hitl import HITLOperator

        if event.get("superseded_by"):
            self.hitl_summary_extra.update({"superseded_by": event["superseded_by"], "approved": False})
            self.log.warning("v%s was superseded by v%s before anyone answered: not promoted",
                             (self.promotion or {}).get("version"), event["superseded_by"])
            return {k: event.get(k) for k in ("superseded_by", "superseded_decision", "chosen_options",
                                               "params_input", "responded_at", "responded_by_user")}
        return HITLOperator.execute_complete(self, context, event)


class FinalizePromotionOperator(NightshiftOperator):
    """After the optional approval: move ``champion`` for an approved candidate and
    record who approved and why; otherwise pass the promotion outcome through.

    How the wait ended is recorded as what it was (history ``action``, version tag
    ``approval``): ``promoted``; ``approval_rejected``; ``approval_stale`` (approved, but
    champion moved while it waited: not moved); ``approval_undeployable`` (approved, but
    the candidate cannot be deployed with ``deploy_target``: not moved); ``superseded``
    (a newer candidate came first, also when it raced an Approve). See :mod:`nightshift.approvals`.

    :param promotion: the ``promote`` result (XCom). (templated)
    :param approval: the ``approve_promotion`` result (XCom; none when it was skipped). (templated)
    :param model_name: registered model. (templated)
    :param deploy_target: the run's deploy target (``docker``, ``kubernetes``, ``none``); for
        ``docker`` and ``kubernetes`` an approved candidate must be deployable before
        ``champion`` moves. ``None``: not checked. (templated)
    :param docker_conn_id: the Airflow connection of the Docker daemon that checks the image (``docker`` target; see
        :func:`nightshift.operators.base.resolve_docker_client`); ``None``:
        ``$NIGHTSHIFT_DOCKER_CONN_ID`` where the task runs, else ``DOCKER_HOST``. (templated)
    """

    template_fields: Sequence[str] = ("promotion", "approval", "model_name", "deploy_target", "docker_conn_id")
    #: Nothing by path: the promotion and the answer are values (their report URIs pass through);
    #: it writes the run's ``promotion.json`` afresh.
    run_folder_reads: Sequence[str] = ()
    store_inputs: Sequence[str] = ()
    ui_color = "#ffe0b2"

    def __init__(self, *, promotion: Any, approval: Any = None, model_name: str, deploy_target: str | None = None,
                 docker_conn_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "none_failed")  # runs when approval was skipped (not needed)
        super().__init__(**kwargs)
        self.promotion = promotion
        self.approval = approval
        self.model_name = model_name
        self.deploy_target = deploy_target
        self.docker_conn_id = docker_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import approvals, contracts, state
        from nightshift.artifacts import atomic_write_json

        outcome = dict(self.require(self.promotion, "promotion", "promote"))
        if not outcome.get("awaiting_approval"):
            return outcome
        store = self.store
        answer = approvals.parse_answer(self.approval, outcome["version"])
        target = str(self.deploy_target or "").strip() or None
        res = approvals.finalize_approval(self.mlflow, self.model_name, outcome["version"], answer=answer,
                                          expected_champion=outcome.get("previous_champion"),
                                          artifact_root=store, deploy_target=target,
                                          docker_client=self.docker_client() if target == "docker" and answer.approved
                                          and answer.superseded_by is None else None)
        person = answer.superseded_by is None  # else nobody answered: the newer candidate ended the wait
        superseded = res["action"] == approvals.SUPERSEDED
        # a superseded answer decided nothing: no "approved"/"rejected by" (the note names who answered)
        outcome.update({"promoted": res["promoted"], "champion": res["champion"], "awaiting_approval": False,
                        "approved_by": answer.actor if person and not superseded else None,
                        "answered_by": answer.actor if person else None,
                        "approval_comment": answer.comment if person else "",
                        "approved": answer.approved and not superseded,
                        "approval": approvals.APPROVAL_TAG_VALUES[res["action"]], "note": res["note"]})
        if res.get("superseded_by"):
            outcome["superseded_by"] = res["superseded_by"]
        # the run's report (and so its run note and the view, on any worker) says what the person
        # decided, not "waiting": published to the store, its URI on XCom
        outcome["report_path"] = store.publish(atomic_write_json(
            self.run_dir(context) / PROMOTION_FILE, {k: v for k, v in outcome.items() if k != "report_path"}))
        state.append_history(store, contracts.HistoryEvent(
            model=self.model_name, action=res["action"], version=outcome["version"],
            previous_champion=outcome.get("previous_champion"), champion=res["champion"], reason=f"{res['note']}",
            actor=answer.actor, dag_id=self.dag_id, run_id=context["run_id"],
            extra={"superseded_by": res["superseded_by"]} if res.get("superseded_by") else {}))
        self.log.warning("%s", res["note"])
        return outcome
