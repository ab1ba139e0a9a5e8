"""The approval operators (nightshift.operators.approval): a candidate waiting for approval; the
wait ends when a newer candidate supersedes it (issue 19 item 2), and every end of the wait is
recorded as what it was, an approval whose champion moved meanwhile included (item 11). The
approval's core without Airflow: test_approvals.py."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")

MODEL = "ap-model"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def reg(nightshift_home):
    from nightshift import registry

    return registry.client(f"sqlite:///{nightshift_home / 'mlflow.db'}")


def _candidate(c, tmp_path: Path, i: int, *, blessed: bool = True, require_approval: bool = False,
               model: str = MODEL) -> dict:
    """Register a real model version the way promote does (a run with an artifact, the decision
    and its baseline recorded); returns register_candidate's outcome."""
    from nightshift import registry
    from nightshift.gates import Decision

    src = tmp_path / f"onnx{i}"
    src.mkdir(exist_ok=True)
    (src / "model.onnx").write_bytes(b"x" * i)
    with registry.training_run(c, "exp", f"r{i}", tags={}, params={},
                               artifact_location=(tmp_path / "art").as_uri()) as run_id:
        registry.log_artifacts(c, run_id, src, "onnx")
    base = registry.get_champion(c, model)
    d = Decision("BLESSED" if blessed else "NOT_BLESSED", f"gates {i}", base["version"] if base else None)
    return registry.register_candidate(c, model, run_id, artifact_path="onnx", tags={"onnx_sha256": f"{i:064d}"},
                                       decision=d, require_approval=require_approval)


def champion(c, model: str = MODEL):
    from nightshift import registry

    got = registry.get_champion(c, model)
    return got["version"] if got else None


def history(model: str = MODEL) -> list[dict]:
    import os

    from nightshift import contracts, state
    return list(state.read_jsonl(contracts.history_path(os.environ["NIGHTSHIFT_ARTIFACT_ROOT"], model)))


class FakeHITL:
    """Stands in for the Execution API's Human-in-the-loop detail of one task instance."""

    def __init__(self) -> None:
        self.response = None
        self.updates: list[dict] = []
        self.refuse_update = False
        self.gets = 0

    def answer(self, option: str, name: str = "bob", comment: str = "") -> None:
        self.response = SimpleNamespace(
            response_received=True, chosen_options=[option], params_input={"comment": comment},
            responded_at=datetime.now(timezone.utc),
            responded_by_user=SimpleNamespace(id=f"id-{name}", name=name))

    def get(self, ti_id):
        self.gets += 1
        return self.response or SimpleNamespace(response_received=False, chosen_options=None, params_input=None,
                                                responded_at=None, responded_by_user=None)

    def update(self, ti_id, chosen_options, params_input):
        if self.refuse_update:
            raise RuntimeError("409 Conflict: already answered")
        self.updates.append({"chosen_options": chosen_options, "params_input": params_input})
        self.response = SimpleNamespace(response_received=True, chosen_options=chosen_options,
                                        params_input=params_input, responded_at=datetime.now(timezone.utc),
                                        responded_by_user=None)
        return self.response


@pytest.fixture
def hitl(monkeypatch):
    import airflow.providers.standard.triggers.hitl as trigger_mod
    import airflow.sdk.execution_time.hitl as sdk_hitl

    fake = FakeHITL()
    monkeypatch.setattr(trigger_mod, "get_hitl_detail_content_detail", fake.get)
    monkeypatch.setattr(sdk_hitl, "update_hitl_detail_response", fake.update)
    return fake


def make_trigger(version: str, **kw):
    from nightshift.operators.approval import (
        PromotionApprovalOperator,
        SupersedableHITLTrigger,
    )

    op = PromotionApprovalOperator(task_id="approve_promotion", promotion={})
    args = dict(ti_id=uuid.uuid4(), options=op.options, defaults=op.defaults, params=op.serialized_params,
                multiple=False, timeout_datetime=datetime.now(timezone.utc) + timedelta(days=7), poke_interval=0.02,
                model_name=MODEL, version=version, supersede_interval=0.05, dag_id="nightly_retrain",
                task_id="approve_promotion", run_id="scheduled__1")
    return SupersedableHITLTrigger(**(args | kw))


def first_event(trigger, within_s: float = 10.0):
    """The trigger's first event, or None when it yields none within ``within_s`` (still waiting)."""

    async def go():
        agen = trigger.run()
        try:
            return await asyncio.wait_for(anext(agen), within_s)
        except asyncio.TimeoutError:
            return None
        finally:
            await agen.aclose()

    return asyncio.run(go())


# --------------------------------------------------------------------------- the trigger


def test_trigger_ends_the_wait_when_a_newer_candidate_is_registered(reg, tmp_path, hitl):
    waiting = _candidate(reg, tmp_path, 1, require_approval=True)
    assert waiting["awaiting_approval"] and champion(reg) is None
    trigger = make_trigger(waiting["version"])
    assert first_event(trigger, within_s=0.5) is None  # nothing newer, nobody answered: it waits
    newer = _candidate(reg, tmp_path, 2, blessed=False)  # even a candidate the gates rejected supersedes it
    event = first_event(make_trigger(waiting["version"]))
    assert event is not None and event.payload["superseded_by"] == newer["version"]
    assert event.payload["superseded_decision"] == "NOT_BLESSED" and event.payload["chosen_options"] == ["Reject"]
    # the request is closed (the Required Actions page no longer offers it), saying why
    (update,) = hitl.updates
    assert update["chosen_options"] == ["Reject"]
    assert f"superseded by the newer candidate v{newer['version']}" in update["params_input"]["comment"]
    assert champion(reg) is None  # the trigger moves nothing


def test_trigger_yields_the_persons_answer(reg, tmp_path, hitl):
    waiting = _candidate(reg, tmp_path, 1, require_approval=True)
    hitl.answer("Approve", name="bob", comment="looks right")
    event = first_event(make_trigger(waiting["version"]))
    assert event is not None and "superseded_by" not in event.payload
    assert event.payload["chosen_options"] == ["Approve"] and event.payload["responded_by_user"]["name"] == "bob"
    assert hitl.updates == []


def test_trigger_keeps_waiting_on_a_hand_registered_version_or_a_registry_error(reg, tmp_path, hitl, monkeypatch):
    from mlflow import MlflowClient

    waiting = _candidate(reg, tmp_path, 1, require_approval=True)
    # a version registered by hand (no promotion decision) is not a candidate
    reg.create_model_version(MODEL, source=(tmp_path / "art").as_uri(), tags={"owner": "someone"})
    assert first_event(make_trigger(waiting["version"]), within_s=0.5) is None

    def down(*_a, **_k):
        raise ConnectionError("registry unreachable")

    _candidate(reg, tmp_path, 3)
    monkeypatch.setattr(MlflowClient, "search_model_versions", down)
    assert first_event(make_trigger(waiting["version"]), within_s=0.5) is None  # fail closed: still asks the person
    assert hitl.gets > 3 and hitl.updates == []


def test_trigger_hands_on_an_answer_that_beat_the_supersession(reg, tmp_path, hitl):
    waiting = _candidate(reg, tmp_path, 1, require_approval=True)
    _candidate(reg, tmp_path, 2, require_approval=True)
    trigger = make_trigger(waiting["version"])
    hitl.refuse_update = True  # a person answered between the trigger's look and its closing of the request

    original = trigger._handle_response
    calls = {"n": 0}

    async def answered_on_second_look():
        calls["n"] += 1
        if calls["n"] == 2:
            hitl.answer("Approve", name="erin")
        return await original()

    trigger._handle_response = answered_on_second_look
    event = first_event(trigger)
    assert event.payload["chosen_options"] == ["Approve"] and "superseded_by" not in event.payload
    # finalize_promotion still records it as superseded (see test_an_approval_that_raced_...)


def test_trigger_serializes_to_its_own_class_with_every_argument():
    from airflow.sdk._shared.module_loading import import_string

    trigger = make_trigger("4", timeout_datetime=None)
    classpath, kwargs = trigger.serialize()
    assert classpath == "nightshift.operators.approval.SupersedableHITLTrigger"
    again = import_string(classpath)(**copy.deepcopy(kwargs))  # HITLTrigger pops from the params it gets
    assert (again.model_name, again.version, again.supersede_interval, again.task_id) == \
        (MODEL, "4", 0.05, "approve_promotion")
    assert again.serialize() == (classpath, kwargs)


# --------------------------------------------------------------------------- the operator


def test_approval_defers_on_the_supersedable_trigger_instead_of_parking(monkeypatch):
    """Airflow 3.3's awaiting_input park can only be ended by a person or the timeout; the task
    defers on a trigger that a newer candidate ends too."""
    import airflow.providers.standard.operators.hitl as hitl_op
    from airflow.sdk.exceptions import TaskDeferred

    from nightshift.operators.approval import (
        PromotionApprovalOperator,
        SupersedableHITLTrigger,
    )

    written = []
    monkeypatch.setattr(hitl_op, "upsert_hitl_detail", lambda **kw: written.append(kw))
    op = PromotionApprovalOperator(task_id="approve_promotion", promotion={
        "awaiting_approval": True, "model_name": MODEL, "version": "7", "previous_champion": "5", "gates": []})
    ti = SimpleNamespace(id=uuid.uuid4(), dag_id="nightly_retrain", task_id="approve_promotion", run_id="r1")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"task_instance": ti, "ti": ti})
    trigger = deferred.value.trigger
    assert isinstance(trigger, SupersedableHITLTrigger) and deferred.value.method_name == "execute_complete"
    assert (trigger.model_name, trigger.version, trigger.ti_id) == (MODEL, "7", ti.id)
    assert timedelta(days=6, hours=23) < trigger.timeout_datetime - datetime.now(timezone.utc) <= timedelta(days=7)
    assert trigger.defaults is None  # no answer by default: the timeout fails the task, nothing is promoted
    (request,) = written
    assert "v7" in request["body"] and "superseded" in request["body"]


def test_under_dag_test_the_approval_parks_as_airflow_does(monkeypatch):
    """`airflow dags test` (make run) runs triggers in line, with a supervisor that cannot read a
    Human-in-the-loop answer: there the task parks in awaiting_input, and dag.test() waits for
    the answer as before (scripts/progress.py tells the person where to give it)."""
    import airflow.providers.standard.operators.hitl as hitl_op
    from airflow.sdk.exceptions import TaskAwaitingInput
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms

    from nightshift.operators.approval import (
        PromotionApprovalOperator,
        runs_in_dag_test,
    )

    assert not runs_in_dag_test()
    monkeypatch.setattr(hitl_op, "upsert_hitl_detail", lambda **kw: None)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", InProcessSupervisorComms.__new__(InProcessSupervisorComms),
                        raising=False)
    assert runs_in_dag_test()
    op = PromotionApprovalOperator(task_id="approve_promotion", promotion={
        "awaiting_approval": True, "model_name": MODEL, "version": "7", "gates": []})
    ti = SimpleNamespace(id=uuid.uuid4(), dag_id="nightly_retrain", task_id="approve_promotion", run_id="r1")
    with pytest.raises(TaskAwaitingInput):
        op.execute({"task_instance": ti, "ti": ti})


def test_approval_hands_a_supersession_to_finalize():
    from nightshift.operators.approval import PromotionApprovalOperator

    op = PromotionApprovalOperator(task_id="approve", promotion={"awaiting_approval": True, "version": "1"})
    out = op.execute_complete({"ti": None, "task": op}, {
        "superseded_by": "2", "superseded_decision": "BLESSED", "chosen_options": ["Reject"],
        "params_input": {"comment": "superseded"}, "responded_at": datetime.now(timezone.utc),
        "responded_by_user": None, "timedout": False})
    assert out["superseded_by"] == "2" and out["chosen_options"] == ["Reject"]


# --------------------------------------------------------------------------- finalize


def _finalize(ctx, outcome, approval):
    from nightshift.operators import FinalizePromotionOperator

    return FinalizePromotionOperator(task_id="finalize_promotion", model_name=MODEL, promotion=outcome,
                                     approval=approval).execute(ctx)


def _approve(name="bob", comment="ok"):
    return {"chosen_options": ["Approve"], "responded_by_user": {"id": f"id-{name}", "name": name},
            "params_input": {"comment": comment}}


def test_finalize_records_a_superseded_wait_and_leaves_champion_alone(ctx, reg, tmp_path):
    from nightshift.run_notes import run_note

    first = _candidate(reg, tmp_path, 1)  # champion v1
    waiting = _candidate(reg, tmp_path, 2, require_approval=True)
    newer = _candidate(reg, tmp_path, 3, require_approval=True)
    out = _finalize(ctx, waiting, {"superseded_by": newer["version"], "chosen_options": ["Reject"],
                                   "params_input": {"comment": "superseded"}, "responded_by_user": None})
    assert out["promoted"] is False and out["champion"] == first["version"] == champion(reg)
    assert out["approval"] == "superseded" and out["superseded_by"] == newer["version"]
    assert out["approved_by"] is None  # nobody answered
    tags = reg.get_model_version(MODEL, waiting["version"]).tags
    assert tags["nightshift.approval"] == "superseded" and tags["nightshift.superseded_by"] == newer["version"]
    assert tags["nightshift.awaiting_approval"] == "false"
    event = history()[-1]
    assert event["action"] == "superseded" and event["version"] == waiting["version"]
    assert event["extra"] == {"superseded_by": newer["version"]} and event["champion"] == first["version"]
    assert f"v{newer['version']} (BLESSED, waiting for approval)" in event["reason"]
    report = Path(out["report_path"])
    note = run_note(report.parents[3], report.parent.parent.name, report.parent.name) or ""
    assert "NOT PROMOTED" in note and f"superseded by the newer candidate v{newer['version']}" in note
    assert "Rejected by" not in note
    # a retried promote of the superseded run does not move champion either
    from nightshift import registry

    existing = registry.find_candidate(reg, MODEL, reg.get_model_version(MODEL, waiting["version"]).run_id,
                                       f"{2:064d}")
    again = registry.resume_candidate(reg, MODEL, existing)
    assert again["promoted"] is False and champion(reg) == first["version"]


def test_an_approval_that_raced_a_newer_candidate_is_superseded(ctx, reg, tmp_path):
    waiting = _candidate(reg, tmp_path, 1, require_approval=True)
    newer = _candidate(reg, tmp_path, 2, blessed=False)
    out = _finalize(ctx, waiting, _approve("erin", "ship it"))
    assert out["promoted"] is False and champion(reg) is None
    # the Approve decided nothing: not recorded as approved (nor as "approved by"); who answered is kept
    assert out["approval"] == "superseded" and out["approved"] is False and out["approved_by"] is None
    assert out["answered_by"] == "erin"
    event = history()[-1]
    assert event["action"] == "superseded" and event["actor"] == "erin"
    assert f"approved by erin, but superseded by the newer candidate v{newer['version']}" in event["reason"]
    tags = reg.get_model_version(MODEL, waiting["version"]).tags
    assert tags["nightshift.approved_by"] == "erin" and tags["nightshift.approval"] == "superseded"
    from nightshift.run_notes import run_note

    report = Path(out["report_path"])
    note = run_note(report.parents[3], report.parent.parent.name, report.parent.name) or ""
    assert "Approved by erin" not in note and "Rejected by erin" not in note
    assert f"approved by erin, but superseded by the newer candidate v{newer['version']}" in note


def test_an_approval_whose_champion_moved_meanwhile_is_recorded_stale_not_rejected(ctx, reg, tmp_path):
    from nightshift import registry
    from nightshift.run_notes import run_note

    first = _candidate(reg, tmp_path, 1)  # champion v1
    second = _candidate(reg, tmp_path, 2, blessed=False)
    waiting = _candidate(reg, tmp_path, 3, require_approval=True)  # compared with v1
    assert waiting["previous_champion"] == first["version"]
    # while it waits, someone forces v2 (promote_model); no newer candidate is registered
    reg.set_registered_model_alias(MODEL, "champion", second["version"])
    out = _finalize(ctx, waiting, _approve("bob", "numbers look right"))
    assert out["promoted"] is False and champion(reg) == second["version"] == out["champion"]
    event = history()[-1]
    assert event["action"] == "approval_stale" and event["actor"] == "bob"  # was "approval_rejected"
    assert out["approval"] == "stale" and out["approved"] is True
    assert f"champion moved from v{first['version']} to v{second['version']}" in event["reason"]
    assert "not moved" in event["reason"]
    tags = reg.get_model_version(MODEL, waiting["version"]).tags
    assert tags["nightshift.approval"] == "stale" and tags["nightshift.approved_by"] == "bob"
    report = Path(out["report_path"])
    note = run_note(report.parents[3], report.parent.parent.name, report.parent.name) or ""
    assert "Approved by bob" in note and f"champion moved from v{first['version']}" in note
    # and a retry of its promote leaves champion where it is, even once it is back at v1
    reg.set_registered_model_alias(MODEL, "champion", first["version"])
    existing = registry.find_candidate(reg, MODEL, reg.get_model_version(MODEL, waiting["version"]).run_id,
                                       f"{3:064d}")
    assert registry.resume_candidate(reg, MODEL, existing)["promoted"] is False
    assert champion(reg) == first["version"]


def test_finalize_still_promotes_an_approval_nothing_overtook(ctx, reg, tmp_path):
    first = _candidate(reg, tmp_path, 1)
    waiting = _candidate(reg, tmp_path, 2, require_approval=True)
    out = _finalize(ctx, waiting, _approve())
    assert out["promoted"] is True and champion(reg) == waiting["version"] != first["version"]
    assert history()[-1]["action"] == "promoted" and out["approval"] == "approved"
    rejected = _candidate(reg, tmp_path, 3, require_approval=True)
    out = _finalize(ctx, rejected, {"chosen_options": ["Reject"], "responded_by_user": {"name": "carol"},
                                    "params_input": {"comment": "no"}})
    assert out["promoted"] is False and history()[-1]["action"] == "approval_rejected"
    assert champion(reg) == waiting["version"]


class _Images:
    """A Docker client's ``images`` holding only ``have``."""

    def __init__(self, have):
        self.have = set(have)

    def get(self, image):
        from docker.errors import ImageNotFound

        if image not in self.have:
            raise ImageNotFound(f"no such image: {image}")
        return SimpleNamespace(id=f"sha256:{image}")


def _docker(monkeypatch, *images):
    from nightshift import containers

    client = SimpleNamespace(images=_Images(images))
    monkeypatch.setattr(containers, "connect_docker", lambda *a, **k: client)
    return client


def _finalize_to(ctx, outcome, approval, target):
    from nightshift.operators import FinalizePromotionOperator

    return FinalizePromotionOperator(task_id="finalize_promotion", model_name=MODEL, promotion=outcome,
                                     approval=approval, deploy_target=target).execute(ctx)


def test_an_approval_whose_image_is_gone_moves_nothing(ctx, reg, tmp_path, monkeypatch):
    """Retention removed the waiting candidate's image: the Approve is recorded, champion stays
    (the deploy that follows would fail, and registry and port would disagree)."""
    from nightshift import registry

    first = _candidate(reg, tmp_path, 1)  # champion v1
    waiting = _candidate(reg, tmp_path, 2, require_approval=True)
    for v in (first, waiting):
        reg.set_model_version_tag(MODEL, v["version"], "nightshift.image", f"img:{v['version']}")
    _docker(monkeypatch, f"img:{first['version']}")  # v2's image is gone
    out = _finalize_to(ctx, waiting, _approve("bob", "ship it"), "docker")
    assert out["promoted"] is False and champion(reg) == first["version"] == out["champion"]
    assert out["approval"] == "undeployable" and out["approved_by"] == "bob"
    assert f"img:{waiting['version']}" in out["note"] and "not promoted" in out["note"]
    event = history()[-1]
    assert event["action"] == "approval_undeployable" and event["champion"] == first["version"]
    assert f"img:{waiting['version']}" in event["reason"]
    tags = reg.get_model_version(MODEL, waiting["version"]).tags
    assert tags["nightshift.approval"] == "undeployable" and tags["nightshift.awaiting_approval"] == "false"
    # a retried promote of that run does not move champion either
    existing = registry.find_candidate(reg, MODEL, reg.get_model_version(MODEL, waiting["version"]).run_id,
                                       f"{2:064d}")
    assert registry.resume_candidate(reg, MODEL, existing)["promoted"] is False
    assert champion(reg) == first["version"]


def test_an_approval_whose_image_is_there_is_promoted(ctx, reg, tmp_path, monkeypatch):
    _candidate(reg, tmp_path, 1)
    waiting = _candidate(reg, tmp_path, 2, require_approval=True)
    reg.set_model_version_tag(MODEL, waiting["version"], "nightshift.image", "img:2")
    _docker(monkeypatch, "img:2")
    out = _finalize_to(ctx, waiting, _approve(), "docker")
    assert out["promoted"] is True and champion(reg) == waiting["version"] and out["approval"] == "approved"
    # kubernetes needs the image tag only; none checks nothing
    bare = _candidate(reg, tmp_path, 3, require_approval=True)  # no image tag
    out = _finalize_to(ctx, bare, _approve(), "kubernetes")
    assert out["promoted"] is False and out["approval"] == "undeployable" and "no nightshift.image tag" in out["note"]
    assert champion(reg) == waiting["version"]


def test_a_retried_finalize_after_the_move_records_promoted_not_superseded(ctx, reg, tmp_path):
    """The first try approved and moved champion, then died before its history line; a newer
    candidate registered before the retry. The retry records the promotion that happened."""
    from nightshift import approvals

    first = _candidate(reg, tmp_path, 1)
    waiting = _candidate(reg, tmp_path, 2, require_approval=True)
    approvals.finalize_approval(reg, MODEL, waiting["version"], answer=approvals.parse_answer(_approve(), "2"),
                                expected_champion=first["version"], artifact_root=tmp_path / "artifacts")
    # (that was the first try, up to its death)
    assert champion(reg) == waiting["version"]
    assert [e["action"] for e in history()].count("promoted") == 0
    _candidate(reg, tmp_path, 3, require_approval=True)  # a newer candidate, before the retry
    out = _finalize(ctx, waiting, _approve())  # the retry
    assert out["promoted"] is True and out["approval"] == "approved" and out["champion"] == waiting["version"]
    assert champion(reg) == waiting["version"]
    events = [e for e in history() if e["version"] == waiting["version"]]
    assert [e["action"] for e in events] == ["promoted"]
    _finalize(ctx, waiting, _approve())  # and once more: still one line
    assert [e["action"] for e in history() if e["version"] == waiting["version"]] == ["promoted"]
    tags = reg.get_model_version(MODEL, waiting["version"]).tags
    assert tags["nightshift.approval"] == "approved" and "nightshift.superseded_by" not in tags


def test_finalize_on_a_registry_error_promotes_nothing(ctx, reg, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from nightshift.errors import RegistryError

    waiting = _candidate(reg, tmp_path, 1, require_approval=True)

    def deny(*_a, **_k):
        raise MlflowException("denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "search_model_versions", deny)
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):  # retryable; nothing moved
        _finalize(ctx, waiting, _approve())
    assert champion(reg) is None


# --------------------------------------------------------------------------- the DAG


@pytest.fixture(scope="module")
def nightly():
    from airflow.dag_processing.dagbag import DagBag

    root = Path(__file__).resolve().parents[2]
    bag = DagBag(dag_folder=str(root / "dags" / "nightly_retrain.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["nightly_retrain"]


def test_nightly_retrain_lets_a_newer_run_start_while_one_waits_for_approval(nightly):
    from nightshift.operators import PromotionApprovalOperator

    assert nightly.max_active_runs > 1
    # what must not overlap stays serialised
    assert nightly.get_task("train_gpu").pool == "nightshift_gpu"
    assert nightly.get_task("system_eval").max_active_tis_per_dag == 1
    approve = nightly.get_task("approve_promotion")
    assert isinstance(approve, PromotionApprovalOperator) and approve.model_name == "{{ params.model_name }}"
    assert approve.max_active_tis_per_dag is None  # a waiting approval never holds back another run's


def test_the_cooldown_of_overlapping_drift_runs_lets_only_one_through(nightly, nightshift_home, monkeypatch):
    """Two drift-triggered runs that reach cooldown together (runs overlap now): exactly one
    proceeds, the other sees its start and is held back."""
    from nightshift import contracts, state

    real = state.last_retrain_start

    def slow_read(*a, **k):  # widen the read-then-record window
        got = real(*a, **k)
        time.sleep(0.3)
        return got

    monkeypatch.setattr(state, "last_retrain_start", slow_read)
    task = nightly.get_task("cooldown")
    results = {}

    def run(run_id):
        context = {"dag": nightly, "dag_run": SimpleNamespace(run_type="asset_triggered"), "run_id": run_id,
                   "params": {"retrain_cooldown_hours": 6}, "prev_start_date_success": None}
        results[run_id] = task.python_callable(**context)

    threads = [threading.Thread(target=run, args=(f"asset_triggered__{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, True], results
    record = json.loads(contracts.retrain_started_path(nightshift_home / "artifacts", "nightly_retrain").read_text())
    assert results[record["run_id"]] is True


def test_the_approval_form_inside_the_dag_has_its_comment_field(nightly):
    """Inside a DAG, Airflow hands the operator the DAG's params (which HITLOperator drops):
    the comment field used to vanish from the real request, so no comment could be recorded."""
    approve = nightly.get_task("approve_promotion")
    assert set(approve.serialized_params) == {"comment"}
    assert approve.serialized_params["comment"]["schema"]["type"] == "string"


def test_approval_passes_reject_on_to_finalize_and_never_approves_by_default():
    """ApprovalOperator skips its downstream task on Reject; ours hands the answer to
    finalize_promotion, which records it. An approval default (approve on timeout) is refused."""
    from datetime import datetime, timezone

    from nightshift.operators import PromotionApprovalOperator

    op = PromotionApprovalOperator(task_id="approve", promotion={"awaiting_approval": True})
    assert op.response_timeout is not None
    answer = op.execute_complete({"ti": None, "task": op}, {
        "chosen_options": ["Reject"], "params_input": {"comment": "no"},
        "responded_at": datetime.now(timezone.utc), "responded_by_user": {"id": "u", "name": "carol"}})
    assert answer["chosen_options"] == ["Reject"]  # returned for finalize, no skip attempted (ti is None)
    with pytest.raises(ValueError, match="must not approve by default"):
        PromotionApprovalOperator(task_id="approve2", promotion={}, defaults=["Approve"])
