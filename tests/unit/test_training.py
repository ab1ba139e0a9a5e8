from __future__ import annotations

import numpy as np
import pytest
import torch

from nightshift import training
from nightshift.errors import ConfigError, GPUUnavailable
from nightshift.models import Classifier, classifier_from_checkpoint


def test_train_learns_digits_and_writes_checkpoint(trained, digits_snapshot):
    assert trained.metrics["test_accuracy"] > 0.85
    assert trained.checkpoint_path.is_file()
    ckpt = training.load_checkpoint(trained.checkpoint_path)
    assert ckpt["data_digest"] == digits_snapshot.digest
    assert ckpt["class_names"] == digits_snapshot.class_names
    m = trained.manifest
    assert m["device"] == "cpu" and m["versions"]["torch"] == torch.__version__ and m["seed"] == 0
    assert len(trained.history) == 6


def test_checkpoint_reloads_to_same_predictions(trained, digits_snapshot):
    ckpt = training.load_checkpoint(trained.checkpoint_path)
    model = classifier_from_checkpoint(ckpt)
    x, y = digits_snapshot.split("test")
    with torch.inference_mode():
        logits, emb = model(torch.from_numpy(x))
    acc = (logits.argmax(1).numpy() == y).mean()
    assert acc == pytest.approx(trained.metrics["test_accuracy"])
    assert emb.shape == (len(x), model.net.embedding_dim)


def test_training_is_reproducible(digits_snapshot, tmp_path):
    hp = {"epochs": 1, "width": 8}
    a = training.train(digits_snapshot, tmp_path / "a", hp)
    b = training.train(digits_snapshot, tmp_path / "b", hp)
    assert a.metrics["test_loss"] == pytest.approx(b.metrics["test_loss"], rel=1e-6)


def test_require_gpu_fails_clearly_without_cuda(digits_snapshot, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(GPUUnavailable, match="require_gpu=True"):
        training.train(digits_snapshot, tmp_path, {"epochs": 1}, require_gpu=True)


def test_hparams_are_validated():
    assert training.resolve_hparams({"epochs": "3", "flip": "false"})["epochs"] == 3
    assert training.resolve_hparams({"flip": "true"})["flip"] is True
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        training.resolve_hparams({"epoch": 3})
    with pytest.raises(ConfigError, match="not a valid int"):
        training.resolve_hparams({"epochs": "many"})
    with pytest.raises(ConfigError, match="positive"):
        training.resolve_hparams({"epochs": 0})


def test_augment_keeps_shape_dtype_and_shifts_content():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4, 1).repeat(50, 1, 1, 1)
    out = training.augment(x, 1, True, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


def test_preprocessing_is_inside_the_model():
    model = Classifier("small_cnn", 3, (8, 8, 1), [0.5], [0.25], width=8).eval()
    x = np.full((2, 8, 8, 1), 128, np.uint8)
    pre = model.preprocess(torch.from_numpy(x))
    assert pre.shape == (2, 1, 8, 8)
    assert torch.allclose(pre, torch.full_like(pre, (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_resnet18_variant_runs_on_small_images():
    model = Classifier("resnet18", 4, (16, 16, 3), [0.5] * 3, [0.2] * 3).eval()
    logits, emb = model(torch.zeros((2, 16, 16, 3), dtype=torch.uint8))
    assert logits.shape == (2, 4) and emb.shape == (2, 512)
