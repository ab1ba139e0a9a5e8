"""The figures in the MLflow run: real PNGs, and a missing input skips a figure, never the run."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from nightshift import plots
from nightshift.train_run import write_plots

HISTORY = [{"epoch": e, "train_loss": 2.0 / e, "val_accuracy": 0.5 + 0.1 * e, "val_loss": 1.8 / e,
            "epoch_seconds": 1.0, "train_images_per_second": 1000.0, "lr": 0.003 * (1 - e / 5)} for e in range(1, 5)]


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_training_curves_png(tmp_path):
    assert_png(plots.plot_training_curves(HISTORY, tmp_path / "curves.png", title="digits"))


def test_training_curves_tolerate_missing_keys_and_nan(tmp_path):
    history = [{"epoch": 1, "train_loss": float("nan")}, {"epoch": 2, "train_loss": 0.5}]
    assert_png(plots.plot_training_curves(history, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_training_curves([], tmp_path / "empty.png")


def test_confusion_matrix_png(tmp_path):
    matrix = [[10, 1, 0], [2, 7, 1], [0, 0, 12]]
    assert_png(plots.plot_confusion_matrix(matrix, ["cat", "dog", "bird"], tmp_path / "cm.png"))
    with pytest.raises(ValueError, match="does not match 2 class names"):
        plots.plot_confusion_matrix(matrix, ["cat", "dog"], tmp_path / "bad.png")


def test_write_plots_skips_a_missing_confusion_matrix_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    written = write_plots(HISTORY, {"device": "cpu"}, ["0", "1"], tmp_path)
    assert [p.name for p in written] == ["curves.png"]
    assert "confusion-matrix plot skipped" in caplog.text
    bad = write_plots([], {"confusion_matrix": [[1]]}, ["0", "1"], tmp_path / "bad")
    assert bad == [] and "training curves not drawn" in caplog.text and "confusion-matrix plot not drawn" in caplog.text
    both = write_plots(HISTORY, {"confusion_matrix": [[3, 1], [0, 4]]}, ["0", "1"], tmp_path / "both")
    assert sorted(p.name for p in both) == ["confusion_matrix.png", "curves.png"]
    for p in both:
        assert_png(p)
