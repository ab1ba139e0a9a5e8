"""The classifiers (nightshift.models): preprocessing inside the model, every architecture's outputs,
and a checkpoint that reloads to the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nightshift.models import Classifier


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


@pytest.mark.parametrize("arch, shape", [("fast_cnn", (8, 8, 1)), ("small_cnn", (8, 8, 1)), ("small_cnn", (12, 12, 3))])
def test_every_architecture_gives_logits_and_an_embedding_per_image(arch, shape):
    model = Classifier(arch, 5, shape, [0.5] * shape[2], [0.25] * shape[2], width=8).eval()
    with torch.no_grad():
        logits, emb = model(torch.zeros((3, *shape), dtype=torch.uint8))
    assert logits.shape == (3, 5) and emb.ndim == 2 and emb.shape[0] == 3
    assert torch.isfinite(logits).all()


def test_an_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'vit'; choose one of \['fast_cnn', 'resnet18', 'small_cnn'\]"):
        Classifier("vit", 2, (8, 8, 1), [0.5], [0.25])


def test_a_checkpoint_reloads_to_the_same_outputs_in_eval_mode():
    from nightshift.models import classifier_from_checkpoint

    torch.manual_seed(0)
    model = Classifier("small_cnn", 3, (8, 8, 1), [0.4], [0.3], width=8).eval()
    ckpt = {"model_config": model.config, "state_dict": model.state_dict()}
    again = classifier_from_checkpoint(ckpt)
    x = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])
    assert not again.training and again.config == model.config
