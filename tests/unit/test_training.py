from __future__ import annotations

import numpy as np
import pytest
import torch

from nightshift import training
from nightshift.errors import ConfigError, DataError, GPUUnavailable, NightshiftError, TrainingDiverged
from nightshift.models import Classifier, classifier_from_checkpoint


def test_train_learns_digits_and_writes_checkpoint(trained, digits_snapshot):
    assert trained.metrics["test_accuracy"] > 0.85
    assert trained.checkpoint_path.is_file()
    ckpt = training.load_checkpoint(trained.checkpoint_path)
    assert ckpt["data_digest"] == digits_snapshot.digest
    assert ckpt["class_names"] == digits_snapshot.class_names
    m = trained.manifest
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert m["device"] == expected_device and m["versions"]["torch"] == torch.__version__ and m["seed"] == 0
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
    with pytest.raises(ConfigError, match="at least 1"):
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


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 17, 1000])
@pytest.mark.parametrize("warmup", [0.0, 0.25, 0.99])
def test_lr_schedule_is_defined_for_any_positive_step_count(total, warmup):
    f = [training.lr_factor(s, total, warmup) for s in range(total)]
    assert all(0 < x <= 1.0 for x in f) and max(f) == pytest.approx(1.0)
    peak = int(np.argmax(f))
    assert f[:peak + 1] == sorted(f[:peak + 1]) and f[peak:] == sorted(f[peak:], reverse=True)
    if peak < total - 1:
        assert f[-1] == pytest.approx(0.01)  # decays to the end value at the last step
    with pytest.raises(ConfigError):
        training.lr_factor(0, 0, warmup)


def test_plan_steps_clips_large_batches_and_never_makes_a_batch_of_one():
    assert training.plan_steps(10, 128) == (1, 10)  # batch larger than the split: one step
    assert training.plan_steps(10, 4) == (3, 10)    # 4 + 4 + 2
    assert training.plan_steps(9, 4) == (2, 8)      # 4 + 4; the lone 9th image waits for the next epoch
    with pytest.raises(DataError, match="at least 2"):
        training.plan_steps(1, 4)


def _tiny_snapshot(tmp_path, classes: int, per_class: int):
    from sklearn.datasets import load_digits

    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import SourceData

    d = load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == k)[:per_class] for k in range(classes)])
    images = np.clip(np.rint(d.images[idx] * 255 / 16), 0, 255).astype(np.uint8)[..., None]
    n = len(idx)
    data = SourceData(images=images, labels=d.target[idx].astype(np.int64), class_names=[str(k) for k in range(classes)],
                      orig_sizes=np.tile([[8, 8, 1]], (n, 1)), origins=[f"digits:{i}" for i in idx],
                      source={"kind": "test"})
    return write_snapshot(data, tmp_path / "snaps", val_fraction=0.1, test_fraction=0.2)


@pytest.mark.parametrize("epochs", [1, 2])
def test_tiny_snapshot_trains_with_one_and_two_epochs(tmp_path, epochs):
    snap = _tiny_snapshot(tmp_path, classes=3, per_class=80)  # 240 images: the crash the issue reported
    out = training.train(snap, tmp_path / "out", {"epochs": epochs, "width": 8})
    assert len(out.history) == epochs and 0 <= out.metrics["test_accuracy"] <= 1
    assert all(np.isfinite(h["train_loss"]) for h in out.history)


# Each row: hyperparameters at an edge, and what must happen (None: trains; else the error and message).
BOUNDARIES = [
    ({"epochs": 1}, None),
    ({"batch_size": 100_000}, None),            # larger than the train split
    ({"batch_size": 2}, None),
    ({"lr": 1e-9}, None),                        # learns nothing, but trains
    ({"model": "resnet18", "batch_size": 3}, None),
    ({"lr": 1e6}, None),                         # AdamW + BatchNorm stay finite: bad model, no crash
    ({"lr": 1e30}, (TrainingDiverged, "diverged.*Lower lr")),
    ({"batch_size": 1}, (ConfigError, "batch_size must be at least 2")),
    ({"epochs": 0}, (ConfigError, "at least 1")),
    ({"lr": float("inf")}, (ConfigError, "positive finite")),
    ({"lr": 0}, (ConfigError, "positive finite")),
]


@pytest.mark.parametrize("hp,expected", BOUNDARIES, ids=[str(b[0]) for b in BOUNDARIES])
def test_params_at_their_edges_train_or_fail_clearly(tmp_path, hp, expected):
    snap = _tiny_snapshot(tmp_path, classes=2, per_class=10)  # 2 classes of 10 images
    hp = {"epochs": 2, "width": 8, **hp}
    if expected is None:
        out = training.train(snap, tmp_path / "out", hp)
        assert out.checkpoint_path.is_file() and len(out.history) == hp["epochs"]
    else:
        err, message = expected
        assert issubclass(err, NightshiftError) and not err.retryable
        with pytest.raises(err, match=message):
            training.train(snap, tmp_path / "out", hp)


def test_checkpoint_loading_refuses_arbitrary_objects(tmp_path, trained):
    ckpt = training.load_checkpoint(trained.checkpoint_path)  # a real checkpoint loads with weights_only
    assert set(ckpt) >= {"model_config", "state_dict", "class_names", "data_digest"}
    evil = tmp_path / "evil.pt"
    torch.save({"model_config": {}, "state_dict": {}, "class_names": [],
                "payload": _NotAllowed()}, evil)
    with pytest.raises(DataError, match="cannot be loaded safely"):
        training.load_checkpoint(evil)
    with pytest.raises(DataError, match="does not exist"):
        training.load_checkpoint(tmp_path / "missing.pt")


class _NotAllowed:
    """Any class outside torch's weights-only allow-list stands in for a malicious pickle."""


def test_training_streams_shards_when_the_split_exceeds_the_budget(tmp_path):
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import load_bundled

    snap = write_snapshot(load_bundled(), tmp_path / "snaps", shard_mb=16 * 1024 / 2**20)  # 8 shards
    x, _ = snap.split("train")
    mean, std = training.split_channel_stats(snap, "train")
    assert mean == pytest.approx(training.channel_stats(x)[0]) and std == pytest.approx(training.channel_stats(x)[1])
    out = training.train(snap, tmp_path / "out", {"epochs": 6, "width": 16, "preload_budget_mb": 0.01})
    assert out.manifest["data_feed"] == "stream"
    assert out.metrics["test_accuracy"] > 0.85
