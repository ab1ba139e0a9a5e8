"""A candidate waiting for a person's approval: when a newer candidate supersedes
it, and how each end of the wait is recorded.

A BLESSED candidate that needs approval (``require_approval``, or a run that
loosened the gate file) waits in ``approve_promotion``. That question is about
one version; it must not hold back the runs after it, and it must not be
answered after a newer candidate of the same model exists:

* **Superseded.** A version of the same registered model registered *after* the
  waiting one, with a recorded promotion decision (every candidate that
  ``promote`` registers carries :data:`~nightshift.contracts.VersionTag.DECISION`),
  supersedes it, whatever that decision was: the newer run judged newer data,
  and an answer about an older candidate would promote a comparison nobody looks
  at any more. :func:`superseding_version` finds it from the registry alone (the
  newer run's ``promote`` writes nothing extra). The approval task's trigger
  polls it and ends the wait; :func:`finalize_approval` checks it again, so an
  Approve that raced the newer candidate is recorded as superseded too.
* **Stale.** Approved, but ``champion`` moved while the candidate waited (a
  rollback, ``promote_model``): the gates compared the candidate with a champion
  that no longer serves, so the alias is left where it is.
* **Undeployable.** Approved, but the run deploys (``docker``, ``kubernetes``) and the
  candidate cannot be deployed (:func:`nightshift.champion.deploy_target`: e.g. image
  retention removed its image while it waited): the alias is left where it is, so the
  registry and the serving port never disagree (fail closed).

Outcomes (the ``action`` of the promotion-history line, and the version tag
``approval``): ``promoted`` (approved), ``approval_rejected`` (rejected),
``approval_stale`` (approved, champion moved meanwhile), ``approval_undeployable``
(approved, cannot be deployed), ``superseded`` (a newer candidate arrived first).
Only ``promoted`` moves ``champion``. A retry of a ``finalize_promotion`` whose first
try moved ``champion`` (and died before its history line) records ``promoted``, even
if a newer candidate was registered since.

No Airflow here.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from nightshift.contracts import TAG_PREFIX, VersionTag
from nightshift.errors import ConfigError

log = logging.getLogger(__name__)

#: The approval task's options.
APPROVE, REJECT = "Approve", "Reject"

#: History actions of the outcomes of a wait (besides ``promoted``).
REJECTED, STALE, SUPERSEDED = "approval_rejected", "approval_stale", "superseded"
UNDEPLOYABLE = "approval_undeployable"

#: Values of the version tag ``nightshift.approval``.
APPROVAL_TAG_VALUES = {"promoted": "approved", REJECTED: "rejected", STALE: "stale", SUPERSEDED: "superseded",
                       UNDEPLOYABLE: "undeployable"}


@dataclass(frozen=True)
class Answer:
    """What ended the wait: a person's choice, or a newer candidate (``superseded_by``)."""

    approved: bool
    actor: str
    comment: str = ""
    superseded_by: str | None = None


def parse_answer(answer: Mapping[str, Any] | None, version: str) -> Answer:
    """The ``approve_promotion`` result (XCom) as an :class:`Answer`.

    :raises ConfigError: no answer at all (the task gave nothing to finalize).
    """
    answer = answer or {}
    superseded_by = answer.get("superseded_by")
    comment = str((answer.get("params_input") or {}).get("comment") or "")
    if superseded_by not in (None, ""):
        return Answer(approved=False, actor="nightshift", comment=comment, superseded_by=str(superseded_by))
    chosen = answer.get("chosen_options") or []
    if not chosen:
        raise ConfigError(f"v{version} awaits approval but approve_promotion gave no answer")
    who = answer.get("responded_by_user")
    if isinstance(who, Mapping):
        actor = str(who.get("name") or who.get("id") or "")
    else:
        actor = str(who or "")
    if not actor:
        actor = "timeout default" if answer.get("timedout") else "unknown"
    return Answer(approved=chosen[0] == APPROVE, actor=actor, comment=comment)


def superseding_version(c, model_name: str, version: str | int) -> dict[str, Any] | None:
    """The newest version of ``model_name`` registered after ``version`` that carries a
    promotion decision (a candidate of a later ``promote``), or ``None``.

    Returns ``{"version", "decision", "awaiting_approval", "run_id"}``.

    :raises RegistryError: the registry cannot be searched (the caller keeps waiting,
        or, in :func:`finalize_approval`, moves nothing).
    """
    from mlflow.exceptions import MlflowException

    from nightshift import registry

    try:
        mine = int(str(version).lstrip("v"))
    except ValueError as exc:
        raise ConfigError(f"{model_name}: {version!r} is not a model version number") from exc
    try:
        versions = c.search_model_versions(f"name = '{model_name}' and version_number > {mine}")
    except MlflowException as exc:
        if registry.is_not_found(exc):
            return None
        raise registry._registry_error(f"searching versions newer than v{mine}", model_name, exc) from exc
    newer = [mv for mv in versions
             if int(mv.version) > mine and dict(mv.tags or {}).get(f"{TAG_PREFIX}{VersionTag.DECISION}")]
    if not newer:
        return None
    mv = max(newer, key=lambda m: int(m.version))
    tags = dict(mv.tags or {})
    return {"version": str(mv.version), "decision": tags.get(f"{TAG_PREFIX}{VersionTag.DECISION}"),
            "awaiting_approval": tags.get(f"{TAG_PREFIX}awaiting_approval") == "true", "run_id": mv.run_id}


def describe(newer: Mapping[str, Any]) -> str:
    """``v7 (BLESSED, waiting for approval)`` for a :func:`superseding_version` result."""
    state = ", waiting for approval" if newer.get("awaiting_approval") else ""
    return f"v{newer['version']} ({newer.get('decision') or 'no decision'}{state})"


def _tag(c, model_name: str, version: str, tags: Mapping[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    from nightshift import registry

    try:
        for k, v in tags.items():
            c.set_model_version_tag(model_name, str(version), f"{TAG_PREFIX}{k}", str(v))
    except MlflowException as exc:
        raise registry._registry_error(f"recording the approval outcome on v{version}", model_name, exc) from exc


def _champion(c, model_name: str) -> str | None:
    from nightshift import registry

    current = registry.get_champion(c, model_name)
    return current["version"] if current else None


def record_superseded(c, model_name: str, version: str, *, by: Mapping[str, Any], answer: Answer) -> dict[str, Any]:
    """Close the wait of ``version`` as superseded by ``by`` (a :func:`superseding_version`
    result): tags ``approval=superseded``, ``superseded_by``; ``champion`` is not touched."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat()
    tags = {"approval": APPROVAL_TAG_VALUES[SUPERSEDED], "awaiting_approval": "false",
            "superseded_by": str(by["version"]), "superseded_at": stamp}
    if answer.superseded_by is None:  # a person answered, but the newer candidate came first
        tags |= {"approved_by": answer.actor, "approval_comment": answer.comment[:4900] or "-", "approved_at": stamp}
    _tag(c, model_name, version, tags)
    champion = _champion(c, model_name)
    if answer.superseded_by is None:
        said = "approved" if answer.approved else "rejected"
        note = (f"{said} by {answer.actor}, but superseded by the newer candidate {describe(by)}: the answer is about "
                f"a candidate nobody judges any more; champion stays "
                f"{f'v{champion}' if champion else 'unset'}")
    else:
        note = (f"superseded by the newer candidate {describe(by)} before anyone answered; the wait ended and "
                f"champion stays {f'v{champion}' if champion else 'unset'}")
    return {"version": str(version), "promoted": False, "champion": champion, "note": note,
            "action": SUPERSEDED, "superseded_by": str(by["version"])}


def _undeployable(c, model_name: str, version: str, *, answer: Answer, target: str, docker_client: Any,
                  champion: str | None) -> dict[str, Any] | None:
    """``None`` when ``version`` can be deployed with ``target``; else record the approval as
    ``undeployable`` (tags; ``champion`` is not touched) and return the outcome."""
    from nightshift import champion as _champion_mod

    if target == "docker" and docker_client is None:  # a caller's mistake, not the candidate's
        raise ConfigError("checking that the approved candidate can be deployed on 'docker' needs a Docker client")
    try:
        _champion_mod.deploy_target(c, model_name, version, target=target, docker_client=docker_client)
    except ConfigError as exc:
        why = str(exc)
    else:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat()
    _tag(c, model_name, version, {"approved_by": answer.actor, "approval_comment": answer.comment[:4900] or "-",
                                  "approved_at": stamp, "approval": APPROVAL_TAG_VALUES[UNDEPLOYABLE],
                                  "awaiting_approval": "false", "undeployable_reason": why[:4900]})
    note = (f"approved by {answer.actor}, but not promoted: v{version} cannot be deployed with the run's deploy "
            f"target {target!r}: {why} champion stays {f'v{champion}' if champion else 'unset'}")
    log.error("%s", note)
    return {"version": str(version), "promoted": False, "champion": champion, "note": note,
            "action": UNDEPLOYABLE, "superseded_by": None}


def finalize_approval(c, model_name: str, version: str, *, answer: Answer, expected_champion: str | None,
                      artifact_root: Any, deploy_target: str | None = None,
                      docker_client: Any = None) -> dict[str, Any]:
    """Record how the wait of ``version`` ended and move ``champion`` only for an approval
    that is neither superseded, stale nor undeployable.

    :param expected_champion: the champion the gates compared the candidate with.
    :param artifact_root: the artifact store (or a local root folder) whose per-model champion
        lock this takes (:func:`nightshift.champion.champion_lock`).
    :param deploy_target: the run's deploy target: for ``docker`` and ``kubernetes`` the
        candidate must be deployable (:func:`nightshift.champion.deploy_target`) before the
        alias moves; ``None`` / ``none``: not checked.
    :param docker_client: for ``docker``: the Docker client that checks the image.
    :returns: ``{"version", "promoted", "champion", "note", "action", "superseded_by"}``;
        ``action`` is ``promoted``, ``approval_rejected``, ``approval_stale``,
        ``approval_undeployable`` or ``superseded``.
    :raises RegistryError: the registry cannot be read or written (nothing is promoted).
    """
    from nightshift import registry
    from nightshift.champion import champion_lock

    version = str(version)
    if answer.superseded_by is not None:
        newer = superseding_version(c, model_name, version) or {"version": answer.superseded_by}
        return record_superseded(c, model_name, version, by=newer, answer=answer)
    if not answer.approved:
        res = registry.approve_candidate(c, model_name, version, approved=False, actor=answer.actor,
                                         comment=answer.comment, expected_champion=expected_champion)
        return {**res, "action": REJECTED, "superseded_by": None}
    with champion_lock(artifact_root, model_name, purpose=f"finalize approval of v{version}"):
        current = registry.get_champion(c, model_name)
        if current is not None and current["version"] == version \
                and current["tags"].get(f"{TAG_PREFIX}approval") == APPROVAL_TAG_VALUES["promoted"]:
            # an earlier try of this task approved and moved champion (then died before its history
            # line): it was promoted, whatever was registered since
            return {"version": version, "promoted": True, "champion": version, "action": "promoted",
                    "superseded_by": None,
                    "note": f"approved by {answer.actor}; champion already pointed at v{version} (moved by an "
                            "earlier try of this task)"}
        # checked under the lock: a candidate registered after this one, or a champion that moved, wins
        newer = superseding_version(c, model_name, version)
        if newer is not None:
            return record_superseded(c, model_name, version, by=newer, answer=answer)
        current_v = current["version"] if current else None
        expected = None if expected_champion in (None, "", "none") else str(expected_champion).lstrip("v")
        # only an approval that would move the alias (not a stale one) must be deployable
        if deploy_target not in (None, "", "none") and current_v == expected:
            undeployable = _undeployable(c, model_name, version, answer=answer, target=deploy_target,
                                         docker_client=docker_client, champion=current_v)
            if undeployable is not None:
                return undeployable
        res = registry.approve_candidate(c, model_name, version, approved=True, actor=answer.actor,
                                         comment=answer.comment, expected_champion=expected_champion)
        if not res["promoted"]:  # still under the lock: never left tagged "approved" when it did not move
            _tag(c, model_name, version, {"approval": APPROVAL_TAG_VALUES[STALE]})
    if res["promoted"]:
        return {**res, "action": "promoted", "superseded_by": None}
    before = f"v{expected_champion}" if expected_champion else "none"
    now = f"v{res['champion']}" if res["champion"] else "none"
    note = (f"approved by {answer.actor}, but champion moved from {before} to {now} while v{version} waited "
            f"for the answer: not moved (the gates compared v{version} with {before}, which no longer serves)")
    return {**res, "note": note, "action": STALE, "superseded_by": None}
