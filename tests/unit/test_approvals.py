"""The approval's core (nightshift.approvals): reading a person's answer, finding the candidate that
supersedes a waiting one, and describing it. The whole wait, with a real registry and the
operators, is in test_operators_approval.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nightshift import approvals
from nightshift.approvals import APPROVE, REJECT, Answer, describe, parse_answer, superseding_version
from nightshift.contracts import TAG_PREFIX, VersionTag
from nightshift.errors import ConfigError

DECISION = f"{TAG_PREFIX}{VersionTag.DECISION}"


def test_an_approval_names_the_person_and_carries_the_comment():
    answer = parse_answer({"chosen_options": [APPROVE], "responded_by_user": {"id": "7", "name": "ada"},
                           "params_input": {"comment": "numbers look right"}}, "3")
    assert answer == Answer(approved=True, actor="ada", comment="numbers look right")


@pytest.mark.parametrize("who, timedout, actor", [
    ({"id": "7"}, False, "7"),            # no name: the id
    ("bob", False, "bob"),                # a plain string
    (None, True, "timeout default"),      # nobody answered: the task's default did
    (None, False, "unknown"),
])
def test_a_rejection_names_whoever_answered(who, timedout, actor):
    answer = parse_answer({"chosen_options": [REJECT], "responded_by_user": who, "timedout": timedout}, "3")
    assert (answer.approved, answer.actor, answer.comment) == (False, actor, "")


def test_a_superseded_wait_is_never_an_approval_even_with_approve_chosen():
    answer = parse_answer({"superseded_by": 5, "chosen_options": [APPROVE]}, "3")
    assert answer == Answer(approved=False, actor="nightshift", superseded_by="5")


@pytest.mark.parametrize("given", [None, {}, {"chosen_options": []}, {"superseded_by": ""}])
def test_no_answer_at_all_is_a_config_error_naming_the_version(given):
    with pytest.raises(ConfigError, match="v3 awaits approval"):
        parse_answer(given, "3")


def test_describe_says_the_version_its_decision_and_whether_it_waits():
    assert describe({"version": "7", "decision": "BLESSED", "awaiting_approval": True}) == \
        "v7 (BLESSED, waiting for approval)"
    assert describe({"version": "8", "decision": None}) == "v8 (no decision)"


class _Registry:
    """A stand-in MLflow client whose search returns the given versions (and records the filter)."""

    def __init__(self, *versions: tuple[int, dict[str, str]]):
        self.versions = [SimpleNamespace(version=str(v), tags=tags, run_id=f"run{v}") for v, tags in versions]
        self.filters: list[str] = []

    def search_model_versions(self, filter_string: str):
        self.filters.append(filter_string)
        return self.versions


def test_the_newest_later_version_with_a_decision_supersedes():
    c = _Registry((2, {DECISION: "BLESSED"}),           # older: not newer than v3
                  (4, {DECISION: "NOT_BLESSED"}),
                  (6, {}),                             # registered by hand: no decision, no candidate
                  (5, {DECISION: "BLESSED", f"{TAG_PREFIX}awaiting_approval": "true"}))
    assert superseding_version(c, "m", "v3") == {"version": "5", "decision": "BLESSED",
                                                 "awaiting_approval": True, "run_id": "run5"}
    assert c.filters == ["name = 'm' and version_number > 3"]


def test_nothing_supersedes_without_a_later_candidate():
    assert superseding_version(_Registry((6, {}), (1, {DECISION: "BLESSED"})), "m", 3) is None


def test_a_version_that_is_not_a_number_is_a_config_error():
    with pytest.raises(ConfigError, match="'latest' is not a model version number"):
        superseding_version(_Registry(), "m", "latest")


def test_every_outcome_has_a_tag_value():
    outcomes = {"promoted", approvals.REJECTED, approvals.STALE, approvals.SUPERSEDED, approvals.UNDEPLOYABLE}
    assert set(approvals.APPROVAL_TAG_VALUES) == outcomes
