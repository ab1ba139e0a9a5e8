"""The run note: what a Nightshift run decided, in a few lines a person reads on the run.

Built from the run's ``promotion.json`` (read through the artifact store, so it works
when the reader — the scheduler — shares no folder with the workers). The Airflow
listener that writes it onto the DAG run is ``nightshift.operators.listeners``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
MARK = "[nightshift] "


def run_note(artifact_root: Any, dag_id: str, run_id: str) -> str | None:
    """The note for one run, from its ``promotion.json`` in the artifact store (or a local root
    folder); None when there is none or it is not JSON.

    :raises StoreError: the store cannot be reached (the caller logs it; no note is written).
    """
    from nightshift.artifacts import run_path
    from nightshift.contracts import RUN_REPORTS, as_store
    from nightshift.store import StoreError

    rel = (run_path("", dag_id, run_id) / RUN_REPORTS["promotion"]).as_posix()
    try:
        p = as_store(artifact_root).read_json(rel)
    except StoreError as exc:
        if exc.retryable:
            raise
        log.warning("no Nightshift note for %s %s: %s", dag_id, run_id, exc)
        return None
    if not isinstance(p, dict):
        return None
    model, version = p.get("model_name"), p.get("version")
    if p.get("promoted"):
        head = f"PROMOTED {model} v{version} to champion (was {('v' + str(p['previous_champion'])) if p.get('previous_champion') else 'none'})"
    elif p.get("awaiting_approval"):
        head = f"BLESSED {model} v{version}: waiting for approval (task approve_promotion)"
    else:
        head = f"NOT PROMOTED {model} v{version}; champion stays {('v' + str(p['champion'])) if p.get('champion') else 'none'}"
    failed = [g for g in p.get("gates", []) if not g.get("passed")]
    lines = [MARK + head, "", str(p.get("reason", ""))]
    if p.get("approved_by"):  # a person answered approve_promotion: say who and what
        lines += ["", f"{'Approved' if p.get('approved') else 'Rejected'} by {p['approved_by']}"
                      + (f": {p['approval_comment']}" if p.get("approval_comment") else "")]
    if p.get("approval") in ("superseded", "stale", "undeployable") and p.get("note"):
        lines += ["", str(p["note"])]  # the wait ended and champion did not move: say why
    if p.get("loosened_thresholds"):  # also after the answer: what the person approved or rejected
        lines += ["", "Approval needed: this run loosened the gate file:" if p.get("awaiting_approval")
                  else "This run loosened the gate file:", *[f"- {why}" for why in p["loosened_thresholds"]]]
    if p.get("data_changed"):
        lines += ["", "Approval needed: this run's data differs from the champion's:" if p.get("awaiting_approval")
                  else "This run's data differs from the champion's:", *[f"- {why}" for why in p["data_changed"]]]
    if failed:
        lines += ["", *[f"- {g['name']}: {g.get('detail', '')}" for g in failed]]
    evidence = _evidence_line(p.get("evidence") or {})  # last: the note is cut at 1,000 characters
    if evidence:
        lines += ["", evidence]
    return "\n".join(lines)[:1000]


def _evidence_line(ev: dict) -> str:
    """One line on how much the accuracies are worth: n, 95% intervals, the paired comparison."""
    if not ev.get("test_images"):
        return ""
    parts = [f"Evidence: {ev['test_images']} test images (min {ev.get('min_test_images')})"]
    for name, a in (ev.get("accuracies") or {}).items():
        ci = a.get("ci95") or []
        if a.get("value") is not None and len(ci) == 2:
            parts.append(f"{name} {float(a['value']):.4f} (95% CI {float(ci[0]):.3f}-{float(ci[1]):.3f})")
    paired = ev.get("paired") or {}
    if paired.get("mcnemar_p") is not None:
        parts.append(f"paired vs champion: {paired.get('champion_only_correct')} images only the champion got "
                     f"right, {paired.get('candidate_only_correct')} only the candidate, McNemar p="
                     f"{float(paired['mcnemar_p']):.3g}")
    return "; ".join(parts)


def with_deadlines(note: str | None, missed: list[str]) -> str | None:
    """The note with the deadline misses right under its first line (a note is cut at 1,000
    characters); a run with no promotion decision gets a note of its misses alone."""
    if not missed:
        return note
    if note is None:
        return "\n".join([MARK + missed[0], *missed[1:]])
    head, _, rest = note.partition("\n")
    return "\n".join([head, *missed, rest])[:1000]
