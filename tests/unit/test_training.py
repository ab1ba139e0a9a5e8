from __future__ import annotations

import numpy as np
import pytest
import torch

from nightshift import training
from nightshift.errors import ConfigError, DataError, GPUUnavailable, NightshiftError, TrainingDiverged
from nightshift.models import classifier_from_checkpoint


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
    from tests.snapshots import digits_subset_snapshot

    return digits_subset_snapshot(tmp_path, classes=classes, per_class=per_class)


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


# --- the speed-record recipe: augmentation, EMA, TTA, defaults by input size -------------------------------------

def test_augment_translates_by_a_uniform_shift_with_reflected_edges_and_mirrors_half():
    n, h, w = 4000, 8, 8
    gen = torch.Generator().manual_seed(1)
    # a single "marker" pixel at (4, 4) of a zero image: where it lands tells the shift and the flip
    x = torch.zeros((n, h, w, 1), dtype=torch.uint8)
    x[:, 4, 4, 0] = 255
    out = training.augment(x, 2, True, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # content preserved: one marker, same value
    ys, xs = (out[..., 0] == 255).nonzero()[:, 1], (out[..., 0] == 255).nonzero()[:, 2]
    dy = ys - 4
    assert set(dy.tolist()) == {-2, -1, 0, 1, 2}
    counts = torch.bincount(dy + 2, minlength=5).double() / n
    assert torch.allclose(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.03)  # uniform shifts
    # mirrored column of 4 is 3: columns 1..5 (not flipped) and 1..5 around 3 (flipped) -> 1..6
    assert set(xs.tolist()) == set(range(1, 7))
    # an asymmetric image: half the outputs without translation are mirror images
    y = torch.arange(h * w, dtype=torch.uint8).view(1, h, w, 1).repeat(n, 1, 1, 1)
    fl = training.augment(y, 0, True, torch.Generator().manual_seed(2))
    mirrored = (fl == y.flip(2)).all(dim=(1, 2, 3)).double().mean()
    same = (fl == y).all(dim=(1, 2, 3)).double().mean()
    assert abs(mirrored - 0.5) < 0.05 and mirrored + same == 1


def test_shift_flip_reflects_at_the_edges_like_reflect_padding():
    x = torch.arange(16, dtype=torch.uint8).view(1, 4, 4, 1)
    for dy, dx in [(2, 0), (0, -2), (1, 1), (-1, 2)]:
        expected = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect")
        expected = expected[:, :, 2 - dy:6 - dy, 2 - dx:6 - dx].permute(0, 2, 3, 1).to(torch.uint8)
        got = training.shift_flip(x, torch.tensor([[dy]]), torch.tensor([[dx]]))
        assert torch.equal(got, expected), (dy, dx)


def test_augment_is_deterministic_for_a_seeded_generator_and_off_when_asked():
    x = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    a = training.augment(x, 2, True, torch.Generator().manual_seed(5), cutout=3)
    b = training.augment(x, 2, True, torch.Generator().manual_seed(5), cutout=3)
    c = training.augment(x, 2, True, torch.Generator().manual_seed(6), cutout=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert training.augment(x, 0, False, torch.Generator()) is x


def test_cutout_zeroes_one_square_per_image_at_most_its_size():
    x = torch.full((500, 10, 10, 1), 200, dtype=torch.uint8)
    out = training.augment(x, 0, False, torch.Generator().manual_seed(0), cutout=4)
    zeroed = (out == 0).sum(dim=(1, 2, 3))
    assert zeroed.max() == 16 and zeroed.min() >= 4  # a 4x4 square, clipped at the border
    assert ((out == 0) | (out == 200)).all()


def test_tta_averages_mirror_and_shifted_views():
    calls = []

    def model(xb):
        calls.append(xb.clone())
        return xb.float().mean(dim=(1, 2, 3)).view(-1, 1).repeat(1, 2), None

    x = torch.randint(0, 256, (3, 6, 6, 1), dtype=torch.uint8)
    assert torch.equal(training.tta_logits(model, x, 0, True), model(x)[0])
    calls.clear()
    training.tta_logits(model, x, 1, True)
    assert len(calls) == 2 and torch.equal(calls[1], x.flip(2))
    calls.clear()
    training.tta_logits(model, x, 2, False)  # no mirror for data that must not be flipped
    assert len(calls) == 3 and not any(torch.equal(c, x.flip(2)) for c in calls[1:])


def test_weight_ema_tracks_the_model_and_ignores_the_first_steps():
    from nightshift.training import WeightEMA

    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(model, 0.9, every=1)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(0)  # decay min(0.9, 1/10) = 0.1: mostly the new weights
    assert torch.allclose(ema.model.weight, 0.1 * before + 0.9)
    for step in range(1, 200):
        ema.update(step)
    assert torch.allclose(ema.model.weight, torch.ones_like(ema.model.weight), atol=1e-6)
    assert not ema.model.weight.requires_grad


def test_defaults_depend_on_the_input_size():
    small = training.resolve_hparams({}, (8, 8, 1))
    large = training.resolve_hparams({}, (32, 32, 3))
    assert (small["model"], small["optimizer"], small["batch_size"], small["flip"]) == ("small_cnn", "adamw", 128, False)
    assert (large["model"], large["optimizer"], large["batch_size"], large["flip"]) == ("fast_cnn", "sgd", 1024, True)
    assert large["ema"] > 0 and large["tta"] == 2 and small["ema"] == 0
    assert all(v not in (None, "auto") for v in (*small.values(), *large.values()))
    assert training.resolve_hparams({"model": "resnet18"}, (32, 32, 3))["optimizer"] == "adamw"
    assert training.resolve_hparams({"batch_size": 64}, (32, 32, 3))["batch_size"] == 64  # explicit wins
    unresolved = training.resolve_hparams({"epochs": None, "lr": ""})
    assert unresolved["epochs"] is None and unresolved["lr"] is None


@pytest.mark.parametrize("hp,message", [
    ({"model": "vgg"}, "model must be one of"), ({"optimizer": "lion"}, "optimizer must be one of"),
    ({"ema": 1.0}, "ema must be in"), ({"tta": 3}, "tta must be"), ({"momentum": 1.0}, "momentum must be"),
    ({"cutout": -1}, ">= 0"), ({"bias_lr_scale": 0}, "bias_lr_scale"),
])
def test_new_hparams_are_validated(hp, message):
    with pytest.raises(ConfigError, match=message):
        training.resolve_hparams(hp)


def test_crop_larger_than_the_image_fails_clearly(tmp_path):
    snap = _tiny_snapshot(tmp_path, classes=2, per_class=10)
    with pytest.raises(ConfigError, match="crop_pad"):
        training.train(snap, tmp_path / "out", {"epochs": 1, "width": 8, "crop_pad": 8})


def test_fast_recipe_path_trains_with_ema_tta_and_whitening_and_exports(tmp_path, digits_snapshot):
    """The 32×32 default's code path (fast_cnn, data-initialised whitening, SGD-Nesterov with a
    BatchNorm-shift group, EMA, TTA) on the digits at CPU size."""
    from nightshift.export import check_parity, export_onnx

    hp = {"model": "fast_cnn", "width": 8, "batch_size": 128, "epochs": 4, "ema": 0.9, "tta": 2, "lr": 0.2}
    r = training.train(digits_snapshot, tmp_path / "out", hp)
    assert r.manifest["hparams"]["optimizer"] == "sgd" and r.manifest["hparams"]["bias_lr_scale"] == 64
    assert r.metrics["test_accuracy"] > 0.8 and 0 <= r.metrics["test_accuracy_tta"] <= 1
    ckpt = training.load_checkpoint(r.checkpoint_path)
    model = classifier_from_checkpoint(ckpt)
    w = model.net.whiten.weight
    assert not torch.allclose(w, torch.zeros_like(w)) and torch.allclose(w[:4], -w[4:])  # ± eigen-patches
    x, _ = digits_snapshot.split("test")
    with torch.inference_mode():
        acc = (model(torch.from_numpy(x))[0].argmax(1).numpy() == digits_snapshot.split("test")[1]).mean()
    assert acc == pytest.approx(r.metrics["test_accuracy"])  # the saved weights are the evaluated (EMA) ones
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx")
    assert check_parity(ckpt, onnx_path, x)["passed"]


def test_small_default_trains_digits_to_090(tmp_path, digits_snapshot):
    r = training.train(digits_snapshot, tmp_path / "out", {"epochs": 8})
    assert r.manifest["hparams"]["model"] == "small_cnn" and r.metrics["test_accuracy"] >= 0.9
    assert r.metrics["first_step_seconds"] > 0 and r.metrics["steady_images_per_second"] > 0


def test_resnet18_is_still_selectable(tmp_path):
    snap = _tiny_snapshot(tmp_path, classes=2, per_class=10)
    r = training.train(snap, tmp_path / "out", {"model": "resnet18", "epochs": 1, "batch_size": 8})
    assert r.manifest["hparams"]["model"] == "resnet18"
    assert training.load_checkpoint(r.checkpoint_path)["model_config"]["arch"] == "resnet18"
