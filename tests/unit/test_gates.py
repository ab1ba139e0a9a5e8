from __future__ import annotations

import pytest

from nightshift.gates import BLESSED, NOT_BLESSED, THRESHOLD_KEYS, Evidence, decide

T = {"min_accuracy": 0.9, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 200.0, "min_throughput_rps": 50.0,
     "served_accuracy_tolerance": 0.01, "champion_tolerance": 0.01, "champion_relative_tolerance": 0.02,
     "min_test_images": 200, "champion_alpha": 0.05}


def good(**over) -> Evidence:
    e = dict(validation_passed=True, offline_accuracy=0.95, parity_passed=True, served_accuracy=0.95,
             p95_latency_ms=20.0, serving_errors=0, champion_accuracy=None, champion_version=None,
             p99_latency_ms=40.0, throughput_rps=300.0, test_images=1000, served_images=1000)
    if over.get("champion_accuracy") is not None:  # a re-scored champion comes with its paired counts
        e.update(champion_only_correct=12, candidate_only_correct=10)
    e.update(over)
    return Evidence(**e)


def test_all_gates_pass_blesses():
    d = decide("abc", good(), T)
    assert d.decision == BLESSED and d.blessed and all(g.passed for g in d.gates)
    assert {g.name for g in d.gates} == {"data_validation", "offline_accuracy", "onnx_parity", "served_accuracy",
                                         "p95_latency", "p99_latency", "throughput", "serving_errors",
                                         "vs_champion"}


@pytest.mark.parametrize("missing", THRESHOLD_KEYS)
def test_no_threshold_means_no_promotion(missing):
    t = {k: v for k, v in T.items() if k != missing}
    d = decide("abc", good(), t)
    assert d.decision == NOT_BLESSED and missing in d.reason


@pytest.mark.parametrize("over,gate", [
    ({"validation_passed": False}, "data_validation"),
    ({"offline_accuracy": 0.5, "served_accuracy": 0.5}, "offline_accuracy"),
    ({"parity_passed": False}, "onnx_parity"),
    ({"served_accuracy": 0.90}, "served_accuracy"),
    ({"served_accuracy": None}, "served_accuracy"),
    ({"p95_latency_ms": 150.0}, "p95_latency"),
    ({"p99_latency_ms": 250.0}, "p99_latency"),
    ({"p99_latency_ms": None}, "p99_latency"),
    ({"throughput_rps": 10.0}, "throughput"),
    ({"throughput_rps": None}, "throughput"),
    ({"serving_errors": 1}, "serving_errors"),
    ({"champion_accuracy": 0.99, "champion_version": "3"}, "vs_champion"),
])
def test_each_failed_gate_blocks_and_is_named_with_numbers(over, gate):
    d = decide("abc", good(**over), T)
    assert d.decision == NOT_BLESSED
    failed = [g.name for g in d.gates if not g.passed]
    assert failed == [gate]
    assert gate in d.reason


def test_champion_within_tolerance_passes():
    d = decide("abc", good(offline_accuracy=0.95, served_accuracy=0.95, champion_accuracy=0.955, champion_version="2"), T)
    assert d.blessed and d.baseline == "2"


def test_a_champion_that_cannot_be_rescored_blocks_promotion():
    d = decide("abc", good(champion_accuracy=None, champion_version="4",
                           champion_error="model expects [8, 8, 1] but the data is [32, 32, 3]"), T)
    assert d.decision == NOT_BLESSED
    gate = next(g for g in d.gates if g.name == "vs_champion")
    assert not gate.passed and "v4 could not be compared: model expects [8, 8, 1]" in gate.detail


@pytest.mark.parametrize("candidate,champion,passes", [
    (0.95, 0.955, True),    # −0.005: within 0.01 absolute and 2 % relative
    (0.94, 0.955, False),   # −0.015: beyond the absolute floor
    (0.50, 0.505, True),    # −0.005 = −0.99 %
])
def test_vs_champion_uses_absolute_and_relative_change_on_the_same_split(candidate, champion, passes):
    t = T | {"champion_tolerance": 0.01, "champion_relative_tolerance": 0.02}
    d = decide("abc", good(offline_accuracy=0.99, served_accuracy=0.99, champion_accuracy=champion,
                           champion_version="2", candidate_accuracy_same_split=candidate), t)
    gate = next(g for g in d.gates if g.name == "vs_champion")
    assert gate.passed is passes and gate.observed["candidate"] == candidate
    strict_relative = t | {"champion_tolerance": 1.0, "champion_relative_tolerance": 0.005}
    gate = next(g for g in decide("abc", good(offline_accuracy=0.99, served_accuracy=0.99, champion_accuracy=0.505,
                                              champion_version="2", candidate_accuracy_same_split=0.50),
                                  strict_relative).gates if g.name == "vs_champion")
    assert not gate.passed and "relative" in gate.detail


def test_thresholds_come_from_the_gate_file_with_params_on_top(tmp_path):
    from nightshift.gates import load_thresholds

    f = tmp_path / "gates.yaml"
    f.write_text("thresholds:\n  min_accuracy: 0.8\n  max_p95_latency_ms: 100\n  unknown_key: 3\n")
    values, origin = load_thresholds(str(f), {"min_accuracy": 0.95, "max_p95_latency_ms": None})
    assert values == {"min_accuracy": 0.95, "max_p95_latency_ms": 100}
    assert origin["min_accuracy"] == "param" and origin["max_p95_latency_ms"].startswith("file")
    assert load_thresholds(str(tmp_path / "missing.yaml"), None) == ({}, {})
    d = decide("abc", good(), values)
    assert not d.blessed and "served_accuracy_tolerance" in d.reason  # the rest unset: fail closed


def test_overrides_looser_than_the_gate_file_are_named_and_tighter_ones_are_not(tmp_path):
    from nightshift.gates import loosened_by_overrides

    f = tmp_path / "gates.yaml"
    f.write_text("thresholds:\n  min_accuracy: 0.9\n  max_p95_latency_ms: 250\n  min_throughput_rps: 50\n"
                 "  champion_tolerance: 0.01\n")
    tighter = {"min_accuracy": 0.95, "max_p95_latency_ms": 100, "min_throughput_rps": "60",
               "champion_tolerance": 0.0, "max_p99_latency_ms": None, "served_accuracy_tolerance": ""}
    assert loosened_by_overrides(str(f), tighter) == []
    assert loosened_by_overrides(str(f), {"min_accuracy": 0.9, "max_p95_latency_ms": 250}) == []  # equal: not looser
    looser = loosened_by_overrides(str(f), {"min_accuracy": 0.8, "max_p95_latency_ms": 300, "min_throughput_rps": 10,
                                            "champion_tolerance": 0.05})
    assert [w.split("=")[0] for w in looser] == ["min_accuracy", "max_p95_latency_ms", "min_throughput_rps",
                                                 "champion_tolerance"]
    assert "0.8" in looser[0] and "0.9" in looser[0] and str(f) in looser[0]
    # less evidence and a smaller significance level are looser too
    f2 = tmp_path / "evidence.yaml"
    f2.write_text("thresholds:\n  min_test_images: 200\n  champion_alpha: 0.05\n")
    assert [w.split("=")[0] for w in loosened_by_overrides(str(f2), {"min_test_images": 50, "champion_alpha": 0.01})] \
        == ["min_test_images", "champion_alpha"]
    assert loosened_by_overrides(str(f2), {"min_test_images": 500, "champion_alpha": 0.1}) == []
    (unset,) = loosened_by_overrides(str(f), {"max_p99_latency_ms": 1000})  # the file says: never promote
    assert "unset" in unset
    assert loosened_by_overrides("", {"min_accuracy": 0.0}) == []  # no gate file: the thresholds are the policy
    (missing,) = loosened_by_overrides(str(tmp_path / "missing.yaml"), {"min_accuracy": 0.5})
    assert "does not exist" in missing
    with pytest.raises(ValueError, match="min_accuracy"):
        loosened_by_overrides(str(f), {"min_accuracy": "high"})
    with pytest.raises(ValueError, match="max_p95_latency_ms"):  # NaN is neither looser nor tighter
        loosened_by_overrides(str(f), {"max_p95_latency_ms": float("nan")})
    # the gate file read once by the caller is what is compared (no second read)
    assert loosened_by_overrides(str(f), {"min_accuracy": 0.5}, policy={"min_accuracy": 0.4}) == []


# --- minimum evidence, intervals and the paired comparison (issue 19, item 6) ------------------


def test_too_few_test_images_fail_every_accuracy_gate_even_on_a_tie():
    """Five test images, candidate and champion both 5/5: not enough evidence, never BLESSED."""
    d = decide("abc", good(offline_accuracy=1.0, served_accuracy=1.0, test_images=5, served_images=5,
                           champion_accuracy=1.0, champion_version="2", candidate_accuracy_same_split=1.0,
                           champion_only_correct=0, candidate_only_correct=0), T)
    assert d.decision == NOT_BLESSED
    failed = {g.name: g.detail for g in d.gates if not g.passed}
    assert set(failed) == {"offline_accuracy", "served_accuracy", "vs_champion"}
    assert failed["offline_accuracy"].startswith("not enough evidence: 5 test images < min_test_images 200")
    assert failed["served_accuracy"].startswith("not enough evidence: 5 served test images < min_test_images 200")
    assert failed["vs_champion"].startswith("not enough evidence: 5 test images < min_test_images 200")
    assert "not enough evidence" in d.reason
    first = decide("abc", good(test_images=5, served_images=5), T)  # no champion: the first run too
    assert {g.name for g in first.gates if not g.passed} == {"offline_accuracy", "served_accuracy", "vs_champion"}
    unknown = decide("abc", good(test_images=None, served_images=None), T)  # fail closed
    assert not unknown.blessed and "number of test images is unknown" in unknown.reason
    enough = decide("abc", good(test_images=200, served_images=200), T)  # at the minimum: enough
    assert enough.blessed


def test_accuracy_gates_report_wilson_intervals_and_n():
    d = decide("abc", good(test_images=221, served_images=221, champion_accuracy=0.95, champion_version="2",
                           candidate_accuracy_same_split=0.95, champion_only_correct=3, candidate_only_correct=3), T)
    assert d.blessed
    g = {x.name: x for x in d.gates}
    lo, hi = g["offline_accuracy"].ci95
    assert g["offline_accuracy"].n == 221 and 0.90 < lo < 0.95 < hi < 0.98
    assert "95% CI" in g["offline_accuracy"].detail and "n=221" in g["offline_accuracy"].detail
    assert g["served_accuracy"].ci95 == [lo, hi] and g["served_accuracy"].n == 221
    vs = g["vs_champion"].observed
    assert vs["n"] == 221 and vs["candidate_ci95"] == vs["champion_ci95"] == [lo, hi] and vs["mcnemar_p"] == 1.0
    assert "McNemar exact p=1" in g["vs_champion"].detail
    assert d.reason.startswith("every gate passed on 221 test images") and "95% CI" in d.reason


def test_wilson_interval_and_mcnemar_agree_with_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint

    from nightshift.gates import mcnemar_exact, wilson_interval

    for k, n in [(5, 5), (0, 7), (190, 200), (210, 221), (3, 10), (9990, 10000)]:
        assert wilson_interval(k, n) == pytest.approx(proportion_confint(k, n, method="wilson"), abs=1e-12)
    assert wilson_interval(0, 0) is None
    for b, c in [(0, 0), (3, 0), (10, 2), (7, 7), (40, 20), (2, 30), (600, 500)]:
        assert mcnemar_exact(b, c) == pytest.approx(mcnemar([[0, b], [c, 0]], exact=True).pvalue, rel=1e-9)


@pytest.mark.parametrize("b, c, alpha, passes", [
    (40, 20, 0.05, False),   # 20 more images only the champion gets right: p = 0.013, significantly worse
    (40, 20, 0.01, True),    # ... not at the 1 % level
    (40, 20, 0.0, True),     # the paired test off
    (12, 10, 0.05, True),    # a difference of 2 images: p = 0.83, no evidence either way
    (20, 40, 0.05, True),    # significantly *better*: never a reason to fail
])
def test_vs_champion_fails_a_significantly_worse_candidate_inside_the_tolerances(b, c, alpha, passes):
    wide = T | {"champion_tolerance": 1.0, "champion_relative_tolerance": 1.0, "champion_alpha": alpha}
    d = decide("abc", good(test_images=1000, champion_accuracy=0.95, champion_version="2",
                           candidate_accuracy_same_split=0.95 - (b - c) / 1000, champion_only_correct=b,
                           candidate_only_correct=c), wide)
    gate = next(g for g in d.gates if g.name == "vs_champion")
    assert gate.passed is passes, gate.detail
    assert gate.observed["champion_only_correct"] == b and gate.observed["candidate_only_correct"] == c
    if not passes:
        assert "significantly worse" in gate.detail and f"alpha {alpha:g}" in gate.detail


def test_vs_champion_without_per_image_results_fails_closed():
    d = decide("abc", good(champion_accuracy=0.95, champion_version="2", champion_only_correct=None,
                           candidate_only_correct=None), T)
    gate = next(g for g in d.gates if g.name == "vs_champion")
    assert not gate.passed and "McNemar's test cannot run" in gate.detail


@pytest.mark.parametrize("bad, match", [
    ({"champion_alpha": 1.5}, "champion_alpha=1.5 is not a significance level"),
    ({"min_test_images": -1}, "min_test_images=-1 is negative"),
    ({"min_test_images": "many"}, "min_test_images='many' is not a number"),
    ({"champion_alpha": float("nan")}, "champion_alpha is not a number"),
])
def test_nonsense_evidence_settings_refuse_promotion_and_name_the_setting(bad, match):
    d = decide("abc", good(), T | bad)
    assert not d.blessed and match in d.reason


def test_the_project_gate_file_sets_every_threshold_and_the_bundled_test_split_is_enough():
    """include/gates.yaml is the reviewed policy: every threshold set (else nothing is ever
    promoted), and `make run`'s bundled digits have more test images than it asks for."""
    from pathlib import Path

    from nightshift.data.snapshot import assign_splits, pixel_hashes
    from nightshift.data.sources import load_bundled
    from nightshift.gates import read_gate_file

    policy = read_gate_file(str(Path(__file__).resolve().parents[2] / "include" / "gates.yaml"))
    assert set(policy) == set(THRESHOLD_KEYS)
    data = load_bundled((8, 8, 1))
    splits = assign_splits(pixel_hashes(data.images), val_fraction=0.1, test_fraction=0.1)
    assert int((splits == "test").sum()) >= policy["min_test_images"]


# --------------------------------------------------------------------------- the drift-retrain cooldown's record


def _cooldown(store, run_id, now, run_type="asset_triggered"):
    from nightshift.gates import drift_retrain_cooldown

    return drift_retrain_cooldown(store, "nightly_retrain", run_type=run_type, run_id=run_id, last_success_start=None,
                                  cooldown_hours=6, now=now)


def test_the_cooldown_records_the_start_it_let_through(tmp_path):
    import json
    from datetime import datetime, timedelta, timezone

    now = datetime(2026, 1, 1, 2, tzinfo=timezone.utc)
    assert _cooldown(tmp_path, "asset_triggered__1", now)[0] is True
    record = tmp_path / "state" / "nightly_retrain" / "last_retrain.json"
    assert json.loads(record.read_text()) == {"started_at": now.isoformat(), "run_id": "asset_triggered__1"}
    proceed, reason = _cooldown(tmp_path, "asset_triggered__2", now + timedelta(hours=1))
    assert proceed is False and "1.0 h ago" in reason
    assert _cooldown(tmp_path, "scheduled__3", now + timedelta(hours=1), run_type="scheduled")[0] is True
    assert _cooldown(tmp_path, "asset_triggered__4", now + timedelta(hours=8))[0] is True  # past the scheduled one's


def test_the_cooldown_lets_one_of_two_workers_through(s3_server, s3_root, tmp_path, monkeypatch):
    """Two drift runs on two workers (no shared folder) reach the cooldown together: the store's
    lock serialises the read-then-record, so exactly one proceeds and the other sees its start."""
    import threading
    from datetime import datetime, timezone

    from nightshift import state
    from nightshift.store import open_store

    real = state.last_retrain_start

    def slow_read(*a, **k):  # widen the read-then-record window
        got = real(*a, **k)
        threading.Event().wait(0.5)
        return got

    monkeypatch.setattr(state, "last_retrain_start", slow_read)
    stores = [open_store(s3_root, cache_dir=tmp_path / f"worker-{i}", s3=s3_server.options()) for i in range(2)]
    results = {}

    def run(i):
        results[i] = _cooldown(stores[i], f"asset_triggered__{i}", datetime.now(timezone.utc))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == [False, True], results
    winner = next(i for i, ok in results.items() if ok)
    assert stores[1 - winner].read_json("state/nightly_retrain/last_retrain.json")["run_id"] == \
        f"asset_triggered__{winner}"
