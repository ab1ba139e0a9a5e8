"""Promotion gates: a pure function from evidence and thresholds to a decision.

TFX-style: the decision names the candidate and the baseline (current champion),
every gate records its observed value and threshold, and with no thresholds
configured nothing is blessed (fail closed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BLESSED = "BLESSED"
NOT_BLESSED = "NOT_BLESSED"

#: Thresholds every promotion needs. ``None`` (unset) means: do not promote.
#: ``champion_tolerance`` / ``champion_relative_tolerance`` are TFX-style change
#: thresholds (higher is better): the candidate may be at most this much (absolute,
#: and relative to the champion) below the champion re-scored on the same examples.
THRESHOLD_KEYS = ("min_accuracy", "max_p95_latency_ms", "max_p99_latency_ms", "min_throughput_rps",
                  "served_accuracy_tolerance", "champion_tolerance", "champion_relative_tolerance")


#: For each threshold, which way is looser: a lower floor, or a higher budget or tolerance.
LOOSER_IF_LOWER = frozenset({"min_accuracy", "min_throughput_rps"})


def read_gate_file(path: str | None) -> dict[str, Any]:
    """The thresholds set in the gate file (none when ``path`` is empty or the file is missing).

    Read it once per decision and pass it as ``policy`` to :func:`load_thresholds` and
    :func:`loosened_by_overrides`.
    """
    import os

    if not path or not os.path.isfile(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    return {k: v for k, v in (doc.get("thresholds") or {}).items() if k in THRESHOLD_KEYS and v is not None}


def load_thresholds(path: str | None, overrides: dict[str, Any] | None = None, *,
                    policy: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Thresholds from the gate file (``include/gates.yaml``) with per-run overrides on top.

    Overrides that are ``None`` or ``""`` do not override. Returns the thresholds
    and where each came from (``file`` / ``param``). A missing or unreadable file
    is not an error here: its thresholds are simply unset, and :func:`decide`
    then refuses to promote (fail closed) and says which are missing.

    :param policy: the gate file already read (:func:`read_gate_file`); default: read ``path``.
    """
    values = dict(read_gate_file(path) if policy is None else policy)
    origin = {k: f"file {path}" for k in values}
    for k, v in (overrides or {}).items():
        if k in THRESHOLD_KEYS and v not in (None, ""):
            values[k], origin[k] = v, "param"
    return values, origin


def loosened_by_overrides(path: str | None, overrides: dict[str, Any] | None, *,
                          policy: dict[str, Any] | None = None) -> list[str]:
    """Per-run overrides that are looser than the gate file: one sentence each.

    The gate file is the reviewed policy; a run's Params may tighten it freely,
    but a lower floor, a larger latency budget or tolerance, or a threshold the
    file leaves unset (which there means "never promote") loosens it, and the
    promote step then asks a person before ``champion`` moves. Without a gate
    file (``path`` empty) there is no policy to loosen: nothing is returned.

    :param policy: the gate file already read (:func:`read_gate_file`); default: read ``path``.
    :raises ValueError: an override is not a finite number.
    """
    import math
    import os

    if not path:
        return []
    if policy is None:
        policy = read_gate_file(path)
    out = []
    for k in THRESHOLD_KEYS:
        v = (overrides or {}).get(k)
        if v in (None, ""):
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            value = math.nan
        if math.isnan(value):  # NaN compares as neither looser nor tighter: refuse it
            raise ValueError(f"threshold {k}={v!r} is not a number")
        if k not in policy:
            unset = "leaves it unset" if os.path.isfile(path) else "does not exist"
            out.append(f"{k}={value:g} is set by this run, while {path} {unset} (never promote)")
            continue
        base = float(policy[k])
        if (value < base) if k in LOOSER_IF_LOWER else (value > base):
            out.append(f"{k}={value:g} from this run is looser than {base:g} in {path}")
    return out


@dataclass
class Evidence:
    validation_passed: bool
    offline_accuracy: float
    parity_passed: bool
    served_accuracy: float | None
    p95_latency_ms: float | None
    serving_errors: int | None
    champion_accuracy: float | None = None  # the champion re-scored on the candidate's test split
    champion_version: str | None = None  # None: there is no champion yet
    candidate_accuracy_same_split: float | None = None  # the candidate scored the same way (ONNX); default offline
    champion_error: str | None = None  # why the champion could not be re-scored (fails vs_champion)
    p99_latency_ms: float | None = None  # the load phase's
    throughput_rps: float | None = None  # the load phase's answered requests per second


@dataclass
class Gate:
    name: str
    passed: bool
    observed: Any
    threshold: Any
    detail: str


@dataclass
class Decision:
    decision: str
    candidate: str
    baseline: str | None
    gates: list[Gate] = field(default_factory=list)
    reason: str = ""

    @property
    def blessed(self) -> bool:
        return self.decision == BLESSED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blessed"] = self.blessed
        return d


def decide(candidate: str, evidence: Evidence, thresholds: dict[str, Any]) -> Decision:
    """Evaluate every gate; BLESSED only if thresholds are all set and every gate passes."""
    missing = [k for k in THRESHOLD_KEYS if thresholds.get(k) is None]
    baseline = evidence.champion_version
    if missing:
        return Decision(NOT_BLESSED, candidate, baseline,
                        reason=f"not promoted because no threshold is configured for: {', '.join(missing)} "
                               "(Nightshift never promotes without explicit thresholds)")
    t = {k: float(thresholds[k]) for k in THRESHOLD_KEYS}
    e = evidence
    gates = [
        Gate("data_validation", bool(e.validation_passed), e.validation_passed, True,
             "Great Expectations suite over the snapshot"),
        Gate("offline_accuracy", e.offline_accuracy >= t["min_accuracy"], e.offline_accuracy, t["min_accuracy"],
             f"test accuracy {e.offline_accuracy:.4f} vs floor {t['min_accuracy']:.4f}"),
        Gate("onnx_parity", bool(e.parity_passed), e.parity_passed, True, "ONNX Runtime agrees with PyTorch"),
    ]
    if e.served_accuracy is None:
        gates.append(Gate("served_accuracy", False, None, t["served_accuracy_tolerance"], "no served accuracy measured"))
    else:
        gap = abs(e.served_accuracy - e.offline_accuracy)
        gates.append(Gate("served_accuracy", gap <= t["served_accuracy_tolerance"] + 1e-12, e.served_accuracy,
                          t["served_accuracy_tolerance"],
                          f"served {e.served_accuracy:.4f} vs offline {e.offline_accuracy:.4f}: gap {gap:.4f} "
                          f"(tolerance {t['served_accuracy_tolerance']:.4f})"))
    gates.append(Gate("p95_latency", e.p95_latency_ms is not None and e.p95_latency_ms <= t["max_p95_latency_ms"],
                      e.p95_latency_ms, t["max_p95_latency_ms"],
                      f"p95 {e.p95_latency_ms if e.p95_latency_ms is not None else 'n/a'} ms vs budget {t['max_p95_latency_ms']} ms"))
    gates.append(Gate("p99_latency", e.p99_latency_ms is not None and e.p99_latency_ms <= t["max_p99_latency_ms"],
                      e.p99_latency_ms, t["max_p99_latency_ms"],
                      f"p99 {e.p99_latency_ms if e.p99_latency_ms is not None else 'n/a'} ms vs budget "
                      f"{t['max_p99_latency_ms']} ms"))
    gates.append(Gate("throughput", e.throughput_rps is not None and e.throughput_rps >= t["min_throughput_rps"],
                      e.throughput_rps, t["min_throughput_rps"],
                      f"{e.throughput_rps if e.throughput_rps is not None else 'n/a (no load phase)'} requests/s "
                      f"under load vs floor {t['min_throughput_rps']}"))
    gates.append(Gate("serving_errors", e.serving_errors == 0, e.serving_errors, 0,
                      f"{e.serving_errors} failed requests during system evaluation"))
    if e.champion_version is None:
        gates.append(Gate("vs_champion", True, e.offline_accuracy, None, "no current champion: nothing to beat"))
    elif e.champion_accuracy is None:  # a champion we cannot compare with blocks promotion (fail closed)
        why = e.champion_error or "no accuracy on today's test split"
        gates.append(Gate("vs_champion", False, e.offline_accuracy, None,
                          f"champion v{e.champion_version} could not be compared: {why}"))
    else:
        cand = e.candidate_accuracy_same_split if e.candidate_accuracy_same_split is not None else e.offline_accuracy
        diff = cand - e.champion_accuracy
        rel = diff / e.champion_accuracy if e.champion_accuracy > 0 else 0.0
        ok = diff >= -t["champion_tolerance"] - 1e-12 and rel >= -t["champion_relative_tolerance"] - 1e-12
        gates.append(Gate("vs_champion", ok, {"candidate": cand, "champion": e.champion_accuracy, "change": diff,
                                              "relative_change": rel},
                          {"absolute": -t["champion_tolerance"], "relative": -t["champion_relative_tolerance"]},
                          f"on the same test split: candidate {cand:.4f} vs champion v{e.champion_version} "
                          f"{e.champion_accuracy:.4f}: change {diff:+.4f} (floor −{t['champion_tolerance']:.4f}), "
                          f"relative {rel:+.2%} (floor −{t['champion_relative_tolerance']:.2%})"))
    failed = [g for g in gates if not g.passed]
    if failed:
        reason = "not promoted because " + "; ".join(f"{g.name} failed ({g.detail})" for g in failed)
        return Decision(NOT_BLESSED, candidate, baseline, gates, reason)
    return Decision(BLESSED, candidate, baseline, gates, "every gate passed")


def retrain_cooldown(run_type: str, last_success_start: Any, now: Any, cooldown_hours: float) -> tuple[bool, str]:
    """Whether a retrain triggered by drift should run, given when the last retrain started
    (the last one that passed this gate, or the last successful run, whichever is later).

    Only drift-triggered (``asset_triggered``) runs are held back: a scheduled or
    manual run always proceeds. Returns ``(proceed, reason)``.
    """
    if run_type != "asset_triggered":
        return True, f"{run_type} run: no cooldown"
    if cooldown_hours is None or float(cooldown_hours) <= 0 or last_success_start is None:
        return True, "drift-triggered; no earlier retrain recorded"
    elapsed_h = (now - last_success_start).total_seconds() / 3600
    if elapsed_h < float(cooldown_hours):
        return False, (f"drift-triggered retrain skipped: the last retrain started {elapsed_h:.1f} h ago, "
                       f"inside the {float(cooldown_hours):g} h cooldown")
    return True, f"drift-triggered; last retrain {elapsed_h:.1f} h ago (cooldown {float(cooldown_hours):g} h)"
