from __future__ import annotations

import pytest

from nightshift.gates import BLESSED, NOT_BLESSED, THRESHOLD_KEYS, Evidence, decide

T = {"min_accuracy": 0.9, "max_p95_latency_ms": 100.0, "served_accuracy_tolerance": 0.01, "champion_tolerance": 0.01}


def good(**over) -> Evidence:
    e = dict(validation_passed=True, offline_accuracy=0.95, parity_passed=True, served_accuracy=0.95,
             p95_latency_ms=20.0, serving_errors=0, champion_accuracy=None, champion_version=None)
    e.update(over)
    return Evidence(**e)


def test_all_gates_pass_blesses():
    d = decide("abc", good(), T)
    assert d.decision == BLESSED and d.blessed and all(g.passed for g in d.gates)
    assert {g.name for g in d.gates} == {"data_validation", "offline_accuracy", "onnx_parity", "served_accuracy",
                                         "p95_latency", "serving_errors", "vs_champion"}


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


def test_champion_without_recorded_accuracy_blocks_promotion():
    d = decide("abc", good(champion_accuracy=None, champion_version="4"), T)
    assert d.decision == NOT_BLESSED
    gate = next(g for g in d.gates if g.name == "vs_champion")
    assert not gate.passed and "v4 has no recorded accuracy" in gate.detail
