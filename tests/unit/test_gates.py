from __future__ import annotations

import pytest

from nightshift.gates import BLESSED, NOT_BLESSED, THRESHOLD_KEYS, Evidence, decide

T = {"min_accuracy": 0.9, "max_p95_latency_ms": 100.0, "max_p99_latency_ms": 200.0, "min_throughput_rps": 50.0,
     "served_accuracy_tolerance": 0.01, "champion_tolerance": 0.01, "champion_relative_tolerance": 0.02}


def good(**over) -> Evidence:
    e = dict(validation_passed=True, offline_accuracy=0.95, parity_passed=True, served_accuracy=0.95,
             p95_latency_ms=20.0, serving_errors=0, champion_accuracy=None, champion_version=None,
             p99_latency_ms=40.0, throughput_rps=300.0)
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


def test_served_model_accuracy_is_the_int8_models_when_it_serves():
    from nightshift.operators.promote import served_model_accuracy

    train = {"metrics": {"test_accuracy": 0.97}}
    kept = {"variant": "int8", "quantization": {"kept": True, "int8_accuracy": 0.962, "fp32_accuracy": 0.97}}
    assert served_model_accuracy(train, kept) == 0.962
    assert served_model_accuracy(train, {"variant": "fp32", "quantization": {"kept": False, "int8_accuracy": 0.5}}) == 0.97
    assert served_model_accuracy(train, {}) == 0.97
