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
#: ``min_test_images`` is the least number of test images any accuracy gate decides on;
#: ``champion_alpha`` the significance level of the paired test against the champion
#: (McNemar's exact test): a candidate significantly worse than the champion at this level
#: fails even inside the tolerances (``0`` switches the test off).
THRESHOLD_KEYS = ("min_accuracy", "max_p95_latency_ms", "max_p99_latency_ms", "min_throughput_rps",
                  "served_accuracy_tolerance", "champion_tolerance", "champion_relative_tolerance",
                  "min_test_images", "champion_alpha")


#: For each threshold, which way is looser: a lower floor, or a higher budget or tolerance.
#: (A lower ``champion_alpha`` calls fewer drops significant: looser.)
LOOSER_IF_LOWER = frozenset({"min_accuracy", "min_throughput_rps", "min_test_images", "champion_alpha"})

#: Two-sided 95 % normal quantile, for the Wilson score intervals.
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (``correct`` of ``n``): at 95 % by default.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small
    ``n`` and accuracies near 1: 5 of 5 right gives [0.566, 1.0], 221 of 232 gives
    about [0.917, 0.973]. ``None`` when ``n`` is 0.
    """
    import math

    if not n:
        return None
    n, p = int(n), min(max(correct / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(champion_only: int, candidate_only: int) -> float:
    """Two-sided p-value of McNemar's exact test on the discordant pairs.

    ``champion_only``: images only the champion classifies correctly; ``candidate_only``:
    images only the candidate does. Images both get right (or both wrong) say nothing
    about which is better. Under "equally good" each discordant image is a fair coin
    (binomial, p = 1/2); the p-value is twice the smaller tail, at most 1 (the same
    number as ``statsmodels``' ``mcnemar(table, exact=True)``). 1.0 without discordant images.
    """
    b, c = int(champion_only), int(candidate_only)
    n = b + c
    if n == 0:
        return 1.0
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def _ci(interval: tuple[float, float] | None) -> str:
    return f"95% CI {interval[0]:.3f}–{interval[1]:.3f}" if interval else "no interval"


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
    test_images: int | None = None  # images in the test split: offline accuracy and both re-scores
    served_images: int | None = None  # images the served accuracy was measured on
    champion_only_correct: int | None = None  # test images only the champion classifies correctly
    candidate_only_correct: int | None = None  # ... only the candidate does (McNemar's discordant pairs)


@dataclass
class Gate:
    name: str
    passed: bool
    observed: Any
    threshold: Any
    detail: str
    n: int | None = None  # images an accuracy gate decided on
    ci95: list[float] | None = None  # Wilson 95 % interval of the observed accuracy


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


def _bad_threshold(t: dict[str, float]) -> str | None:
    import math

    for k, v in t.items():
        if math.isnan(v):
            return f"threshold {k} is not a number"
    if t["min_test_images"] < 0:
        return f"min_test_images={t['min_test_images']:g} is negative"
    if not 0 <= t["champion_alpha"] <= 1:
        return f"champion_alpha={t['champion_alpha']:g} is not a significance level in [0, 1]"
    return None


def _too_few(n: int | None, minimum: float, what: str = "test images") -> str | None:
    """Why ``n`` images are not enough evidence, or None when they are."""
    if n is None:
        return f"not enough evidence: the number of {what} is unknown (min_test_images {minimum:g})"
    if n < minimum:
        return f"not enough evidence: {n} {what} < min_test_images {minimum:g}"
    return None


def decide(candidate: str, evidence: Evidence, thresholds: dict[str, Any]) -> Decision:
    """Evaluate every gate; BLESSED only if thresholds are all set and every gate passes.

    The accuracy gates (``offline_accuracy``, ``served_accuracy``, ``vs_champion``) each
    need at least ``min_test_images`` images, else they fail as "not enough evidence";
    each reports its accuracy with a Wilson 95 % interval. ``vs_champion`` passes when
    the candidate's drop on the same test split is within ``champion_tolerance`` and
    ``champion_relative_tolerance`` and it is not significantly worse than the champion
    image by image (McNemar's exact test on the discordant images, two-sided p-value
    below ``champion_alpha`` with more images only the champion gets right fails).
    """
    missing = [k for k in THRESHOLD_KEYS if thresholds.get(k) is None]
    baseline = evidence.champion_version
    if missing:
        return Decision(NOT_BLESSED, candidate, baseline,
                        reason=f"not promoted because no threshold is configured for: {', '.join(missing)} "
                               "(Nightshift never promotes without explicit thresholds)")
    t: dict[str, float] = {}
    for k in THRESHOLD_KEYS:
        try:
            t[k] = float(thresholds[k])
        except (TypeError, ValueError):
            return Decision(NOT_BLESSED, candidate, baseline,
                            reason=f"not promoted because threshold {k}={thresholds[k]!r} is not a number")
    bad = _bad_threshold(t)
    if bad:
        return Decision(NOT_BLESSED, candidate, baseline, reason=f"not promoted because {bad}")
    e = evidence
    n_test = e.test_images
    few = _too_few(n_test, t["min_test_images"])
    offline_ci = wilson_interval(round(e.offline_accuracy * n_test), n_test) if n_test else None
    offline_ok = e.offline_accuracy >= t["min_accuracy"]
    gates = [
        Gate("data_validation", bool(e.validation_passed), e.validation_passed, True,
             "Great Expectations suite over the snapshot"),
        Gate("offline_accuracy", offline_ok and few is None, e.offline_accuracy, t["min_accuracy"],
             (few + "; " if few else "") +
             f"test accuracy {e.offline_accuracy:.4f} ({_ci(offline_ci)}, n={n_test}) vs floor "
             f"{t['min_accuracy']:.4f}", n=n_test, ci95=list(offline_ci) if offline_ci else None),
        Gate("onnx_parity", bool(e.parity_passed), e.parity_passed, True, "ONNX Runtime agrees with PyTorch"),
    ]
    if e.served_accuracy is None:
        gates.append(Gate("served_accuracy", False, None, t["served_accuracy_tolerance"], "no served accuracy measured"))
    else:
        n_served = e.served_images  # unknown: not enough evidence (never assumed to be the test split)
        few_served = _too_few(n_served, t["min_test_images"], "served test images")
        served_ci = wilson_interval(round(e.served_accuracy * n_served), n_served) if n_served else None
        gap = abs(e.served_accuracy - e.offline_accuracy)
        gates.append(Gate("served_accuracy", gap <= t["served_accuracy_tolerance"] + 1e-12 and few_served is None,
                          e.served_accuracy, t["served_accuracy_tolerance"],
                          (few_served + "; " if few_served else "") +
                          f"served {e.served_accuracy:.4f} ({_ci(served_ci)}, n={n_served}) vs offline "
                          f"{e.offline_accuracy:.4f}: gap {gap:.4f} (tolerance {t['served_accuracy_tolerance']:.4f})",
                          n=n_served, ci95=list(served_ci) if served_ci else None))
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
    gates.append(_vs_champion(e, t, few))
    failed = [g for g in gates if not g.passed]
    if failed:
        reason = "not promoted because " + "; ".join(f"{g.name} failed ({g.detail})" for g in failed)
        return Decision(NOT_BLESSED, candidate, baseline, gates, reason)
    vs = gates[-1]
    return Decision(BLESSED, candidate, baseline, gates,
                    f"every gate passed on {n_test} test images: accuracy {e.offline_accuracy:.4f} "
                    f"({_ci(offline_ci)}); vs_champion: {vs.detail}")


def _vs_champion(e: Evidence, t: dict[str, float], few: str | None) -> Gate:
    """The candidate against the champion, both scored on the same test images (paired)."""
    n = e.test_images
    if e.champion_version is None:
        return Gate("vs_champion", few is None, e.offline_accuracy, None,
                    few or "no current champion: nothing to beat", n=n)
    if e.champion_accuracy is None:  # a champion we cannot compare with blocks promotion (fail closed)
        why = e.champion_error or "no accuracy on today's test split"
        return Gate("vs_champion", False, e.offline_accuracy, None,
                    f"champion v{e.champion_version} could not be compared: {why}", n=n)
    cand = e.candidate_accuracy_same_split if e.candidate_accuracy_same_split is not None else e.offline_accuracy
    diff = cand - e.champion_accuracy
    rel = diff / e.champion_accuracy if e.champion_accuracy > 0 else 0.0
    within = diff >= -t["champion_tolerance"] - 1e-12 and rel >= -t["champion_relative_tolerance"] - 1e-12
    cand_ci = wilson_interval(round(cand * n), n) if n else None
    champ_ci = wilson_interval(round(e.champion_accuracy * n), n) if n else None
    b, c = e.champion_only_correct, e.candidate_only_correct
    paired = b is not None and c is not None
    p = mcnemar_exact(b, c) if paired else None
    alpha = t["champion_alpha"]
    if alpha > 0 and not paired:
        significantly_worse, test = True, "no per-image results to compare pairwise (McNemar's test cannot run)"
    elif paired:
        significantly_worse = alpha > 0 and b > c and p < alpha
        test = (f"paired on the same images: {b} only the champion got right, {c} only the candidate; "
                f"McNemar exact p={p:.3g}" + (f" < alpha {alpha:g}: significantly worse" if significantly_worse
                                            else f" (alpha {alpha:g})" if alpha > 0 else " (test off: alpha 0)"))
    else:  # alpha 0 and no pairs: the test is off
        significantly_worse, test = False, "paired test off (champion_alpha 0)"
    observed = {"candidate": cand, "champion": e.champion_accuracy, "change": diff, "relative_change": rel,
                "n": n, "candidate_ci95": list(cand_ci) if cand_ci else None,
                "champion_ci95": list(champ_ci) if champ_ci else None,
                "champion_only_correct": b, "candidate_only_correct": c, "mcnemar_p": p}
    detail = ((few + "; " if few else "") +
              f"on the same {n} test images: candidate {cand:.4f} ({_ci(cand_ci)}) vs champion "
              f"v{e.champion_version} {e.champion_accuracy:.4f} ({_ci(champ_ci)}): change {diff:+.4f} "
              f"(floor −{t['champion_tolerance']:.4f}), relative {rel:+.2%} "
              f"(floor −{t['champion_relative_tolerance']:.2%}); {test}")
    return Gate("vs_champion", within and not significantly_worse and few is None, observed,
                {"absolute": -t["champion_tolerance"], "relative": -t["champion_relative_tolerance"],
                 "alpha": alpha, "min_test_images": t["min_test_images"]}, detail, n=n,
                ci95=list(cand_ci) if cand_ci else None)


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


#: How long a run's cooldown waits for another run's (the read-then-record takes milliseconds).
COOLDOWN_LOCK_TIMEOUT_S = 120.0


def drift_retrain_cooldown(store: Any, dag_id: str, *, run_type: str, run_id: str, last_success_start: Any,
                           cooldown_hours: float, now: Any = None) -> tuple[bool, str]:
    """The cooldown of a retrain DAG with its shared record: :func:`retrain_cooldown` against the
    later of ``last_success_start`` (Airflow's previous successful run; asset-triggered runs get
    none) and the start this gate recorded last (:func:`nightshift.state.last_retrain_start`);
    a run that proceeds records its own start.

    The read and the record happen under the store's lock on the record (an ``flock`` on a
    local root, a lease on S3), so two overlapping drift runs, on any workers, check one after
    the other and only the first proceeds. Returns ``(proceed, reason)``.

    :param store: the artifact store (or a local root folder).
    :raises ValueError: the record is unreadable (a retrain storm must not pass unseen).
    :raises StoreError: the store cannot be reached, or the lock not taken in time.
    """
    from datetime import datetime, timezone

    from nightshift import contracts, state
    from nightshift.store import as_store

    store = as_store(store)
    with store.lock(contracts.retrain_started_rel(dag_id) + ".lock", timeout_s=COOLDOWN_LOCK_TIMEOUT_S,
                    purpose=f"cooldown {dag_id} {run_id}", what=f"the retrain cooldown of {dag_id!r}"):
        starts = [t for t in (last_success_start, state.last_retrain_start(store, dag_id))
                  if isinstance(t, datetime)]
        now = now or datetime.now(timezone.utc)
        proceed, reason = retrain_cooldown(run_type, max(starts, default=None), now, cooldown_hours)
        if proceed:
            state.record_retrain_start(store, dag_id, now, run_id)
    return proceed, reason
