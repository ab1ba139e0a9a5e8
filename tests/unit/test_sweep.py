"""nightshift.sweep: a model's sweep entry, its trials, the winner on validation and the failure
rule; training's trial mode (the test split is never read) and the winner's test score after."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nightshift.errors import ConfigError
from nightshift.sweep import SweepFailed, allowed_failures, merge_hparams, parse_sweep, select_best

GRID = {"method": "grid", "space": {"lr": [0.5, 1.0, 1.5], "batch_size": [64, 128]}}
RANDOM = {"method": "random", "trials": 8, "seed": 3,
          "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "batch_size": [64, 128, 256],
                    "epochs": {"low": 4, "high": 12}, "label_smoothing": {"low": 0.0, "high": 0.2}}}


# --------------------------------------------------------------------------- trials


def test_grid_is_the_cartesian_product_in_the_listed_order():
    trials = parse_sweep(GRID).trials()
    assert trials == [{"lr": 0.5, "batch_size": 64}, {"lr": 0.5, "batch_size": 128},
                      {"lr": 1.0, "batch_size": 64}, {"lr": 1.0, "batch_size": 128},
                      {"lr": 1.5, "batch_size": 64}, {"lr": 1.5, "batch_size": 128}]
    assert parse_sweep(GRID).size() == 6


def test_grid_expands_int_ranges_and_float_ranges_with_num():
    spec = parse_sweep({"space": {"epochs": {"low": 4, "high": 12, "step": 4},
                                  "lr": {"low": 1e-3, "high": 1e-1, "log": True, "num": 3}}})
    assert spec.method == "grid"  # the default
    assert spec.trials() == [{"epochs": e, "lr": lr} for e in (4, 8, 12) for lr in (0.001, 0.01, 0.1)]


def test_random_draws_are_seeded_typed_and_inside_the_space():
    a, b = parse_sweep(RANDOM).trials(), parse_sweep(RANDOM).trials()
    assert a == b and len(a) == 8
    assert parse_sweep({**RANDOM, "seed": 4}).trials() != a
    for t in a:
        assert 1e-4 <= t["lr"] <= 1e-1 and isinstance(t["lr"], float)
        assert t["batch_size"] in (64, 128, 256)
        assert isinstance(t["epochs"], int) and 4 <= t["epochs"] <= 12
        assert 0.0 <= t["label_smoothing"] <= 0.2
    assert len({t["lr"] for t in a}) > 1  # really drawn


def test_random_draws_do_not_depend_on_the_python_hash_seed(tmp_path):
    code = ("import json; from nightshift.sweep import parse_sweep; "
            f"print(json.dumps(parse_sweep({RANDOM!r}).trials()))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1


def test_trial_values_override_the_base_hparams():
    assert merge_hparams({"epochs": None, "lr": 0.1, "model": "small_cnn"}, {"lr": 0.5}) == {
        "epochs": None, "lr": 0.5, "model": "small_cnn"}


def test_importing_the_core_stays_cheap():
    code = ("import sys, nightshift.sweep; "
            "print(sorted(m for m in ('torch', 'numpy', 'mlflow', 'airflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- schema errors name the field


@pytest.mark.parametrize("entry, field", [
    ({"method": "bayes", "space": {"lr": [1]}}, "sweep.method"),
    ({"space": {}}, "sweep.space"),
    ({"space": {"lr": []}}, "sweep.space.lr"),
    ({"space": {"lr": {"low": 1}}}, "sweep.space.lr.high"),
    ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "sweep.space.lr"),
    ({"space": {"lr": {"low": 0.0, "high": 1.0, "num": 3, "log": True}}}, "sweep.space.lr.low"),
    ({"space": {"lr": {"low": 0.1, "high": 1.0}}}, "sweep.space.lr.num"),  # float range on a grid
    ({"space": {"lr": {"low": 0.1, "high": 1.0, "spread": 2}}}, "sweep.space.lr"),
    ({"space": {"lr": "fast"}}, "sweep.space.lr"),
    ({"space": {"lr": [1, 1]}}, "sweep.space.lr"),
    ({"method": "random", "space": {"lr": [1, 2]}}, "sweep.trials"),
    ({"method": "random", "trials": 0, "space": {"lr": [1, 2]}}, "sweep.trials"),
    ({"trials": 5, "space": {"lr": [1, 2]}}, "sweep.trials"),  # a grid of 2
    ({"max_failed": 1.5, "space": {"lr": [1, 2]}}, "sweep.max_failed"),
    ({"max_failed": 2, "space": {"lr": [1, 2]}}, "sweep.max_failed"),  # every trial may fail
    ({"max_failed": "two", "space": {"lr": [1, 2]}}, "sweep.max_failed"),
    ({"max_parallel": 0, "space": {"lr": [1, 2]}}, "sweep.max_parallel"),
    ({"seed": -1, "space": {"lr": [1, 2]}}, "sweep.seed"),
    ({"metric": "test_accuracy", "space": {"lr": [1, 2]}}, "sweep.metric"),
    ({"space": {"lr": [1, 2]}, "trails": 3}, "trails"),
    ({"space": {"epochs": {"low": 1, "high": 1000}, "width": {"low": 1, "high": 1000}}}, "at most"),
])
def test_a_malformed_entry_names_the_field(entry, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_sweep(entry)


def test_unknown_hyperparameters_are_named_when_the_names_are_given():
    from nightshift.training import DEFAULT_HPARAMS

    with pytest.raises(ConfigError, match=r"models\.yaml: digits\.sweep\.space\.learning_rate"):
        parse_sweep({"space": {"learning_rate": [1]}}, where="models.yaml: digits.sweep",
                    known_hparams=DEFAULT_HPARAMS)


# --------------------------------------------------------------------------- the winner and the failure rule


def rec(trial, val, *, test=None, failed=False, metric="val_accuracy"):
    if failed:
        return {"trial": trial, "failed": True, "error": f"boom {trial}", "hparams": {"lr": trial}}
    m = {metric: val}
    if test is not None:
        m["test_accuracy"] = test
    return {"trial": trial, "failed": False, "metrics": m, "hparams": {"lr": trial}}


def test_the_winner_is_chosen_on_validation_never_on_test():
    results = [rec(0, 0.90, test=0.99), rec(1, 0.95, test=0.80), rec(2, 0.93, test=0.97)]
    assert select_best(results)["trial"] == 1


def test_ties_go_to_the_lowest_trial_index_and_losses_are_minimised():
    assert select_best([rec(2, 0.9), rec(0, 0.9), rec(1, 0.8)])["trial"] == 0
    losses = [rec(0, 0.5, metric="val_loss"), rec(1, 0.2, metric="val_loss"), rec(2, 0.2, metric="val_loss")]
    assert select_best(losses, "val_loss")["trial"] == 1


def test_select_refuses_a_test_metric_and_a_trial_without_the_metric():
    with pytest.raises(ConfigError, match="validation metrics only"):
        select_best([rec(0, 0.9, test=0.9)], "test_accuracy")
    with pytest.raises(ConfigError, match="trial 1 has no val_accuracy"):
        select_best([rec(0, 0.9), {"trial": 1, "metrics": {"train_loss": 0.1}}])


def test_failures_below_the_threshold_are_tolerated_and_above_it_fail_with_the_list():
    results = [rec(0, 0.9), rec(1, None, failed=True), rec(2, 0.95), rec(3, None, failed=True)]
    assert select_best(results, max_failed=2)["trial"] == 2
    assert parse_sweep({**GRID, "max_failed": 0.5}).select_best(results)["trial"] == 2  # 0.5 of 4 = 2
    with pytest.raises(SweepFailed) as info:
        select_best(results, max_failed=1)
    assert [f["trial"] for f in info.value.failures] == [1, 3]
    assert "2 of 4 sweep trials failed" in str(info.value) and "boom 3" in str(info.value)


def test_a_sweep_with_no_successful_trial_fails_even_without_a_threshold():
    with pytest.raises(SweepFailed, match="none of the 2"):
        select_best([rec(0, None, failed=True), rec(1, None, failed=True)])


def test_allowed_failures_counts_and_fractions():
    assert allowed_failures(2, 10) == 2
    assert allowed_failures(0.25, 8) == 2 and allowed_failures(0.25, 7) == 1 and allowed_failures(0.0, 8) == 0
    assert parse_sweep(GRID).allowed_failures() == 1  # default: a quarter of 6


# --------------------------------------------------------------------------- training's trial mode


@pytest.fixture
def split_reads(monkeypatch):
    """Every split the snapshot reader hands out pixels of, in order."""
    from nightshift.data.snapshot import Snapshot

    reads: list[str] = []
    real = Snapshot.iter_split

    def spy(self, name):
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(Snapshot, "iter_split", spy)
    return reads


def test_trial_mode_never_reads_the_test_split_and_the_winner_is_scored_after(digits_snapshot, tmp_path,
                                                                             split_reads):
    from nightshift.training import evaluate_checkpoint, train

    res = train(digits_snapshot, tmp_path / "trial", {"epochs": 2, "width": 8}, evaluate_test=False)
    assert "test" not in split_reads and {"train", "val"} <= set(split_reads)
    assert "test_accuracy" not in res.metrics and 0 < res.metrics["val_accuracy"] <= 1
    assert res.manifest["confusion_split"] == "val" and res.manifest["evaluated_test"] is False
    n_val = digits_snapshot.count("val")
    assert sum(map(sum, res.manifest["confusion_matrix"])) == n_val

    scored = evaluate_checkpoint(digits_snapshot, res.checkpoint_path, "test")
    assert split_reads[-1] == "test"
    assert 0 < scored["test_accuracy"] <= 1 and scored["test_loss"] > 0
    assert sum(map(sum, scored["confusion"])) == digits_snapshot.count("test")


def test_the_winner_scored_afterwards_equals_what_training_reports_on_test(digits_snapshot, tmp_path):
    from nightshift.training import evaluate_checkpoint, train

    full = train(digits_snapshot, tmp_path / "full", {"epochs": 2, "width": 8})
    scored = evaluate_checkpoint(digits_snapshot, full.checkpoint_path, "test")
    assert scored["test_accuracy"] == pytest.approx(full.metrics["test_accuracy"], abs=1e-9)
    assert scored["test_loss"] == pytest.approx(full.metrics["test_loss"], rel=1e-4)


# --------------------------------------------------------------------------- the trial task: its folder, its retry
