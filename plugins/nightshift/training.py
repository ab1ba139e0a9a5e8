"""Training: ``train(snapshot, out_dir, hparams) -> TrainResult``, usable as a library.

airbench-style: the whole split is preloaded onto the device as uint8, augmentation
is batched on the device, mixed precision (bf16 autocast) on CUDA, a warm-up step
before timing, CUDA-event timing on GPU. No Airflow, no MLflow here: the caller
gets per-epoch metrics through ``on_epoch`` and logs them where it likes.
"""

from __future__ import annotations

import io
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nightshift.artifacts import atomic_write_bytes, atomic_write_json
from nightshift.data.snapshot import Snapshot
from nightshift.errors import ConfigError, DataError, GPUUnavailable, TrainingDiverged
from nightshift.settings import to_bool

#: Hyperparameters with their units. Unknown keys are rejected.
DEFAULT_HPARAMS: dict[str, Any] = {
    "model": "small_cnn",      # name in nightshift.models.ARCHITECTURES
    "width": 32,               # channels of the first conv block
    "epochs": 12,              # passes over the training split
    "batch_size": 128,         # images per step
    "lr": 3e-3,                # peak learning rate (AdamW; linear warm-up then linear decay)
    "warmup_fraction": 0.25,   # share of all steps spent warming up (0 = start at the peak)
    "weight_decay": 5e-4,      # AdamW decoupled weight decay
    "label_smoothing": 0.1,    # cross-entropy label smoothing
    "crop_pad": 1,             # random-crop padding, pixels (0 = off)
    "flip": False,             # random horizontal flips (off for digits/text)
    "seed": 0,                 # torch/numpy/python RNG seed
    "amp": True,               # bf16 autocast on CUDA (ignored on CPU)
    "eval_batch_size": 1024,   # images per evaluation step
    "preload_budget_mb": 0.0,  # MiB a split may take on the device to be preloaded; 0 = half the free memory
}


@dataclass
class TrainResult:
    checkpoint_path: Path
    metrics: dict[str, float]
    manifest: dict[str, Any]
    history: list[dict[str, float]]


def resolve_hparams(overrides: dict[str, Any] | None) -> dict[str, Any]:
    hp = dict(DEFAULT_HPARAMS)
    unknown = sorted(set(overrides or {}) - set(hp))
    if unknown:
        raise ConfigError(f"unknown hyperparameter(s) {unknown}; known: {sorted(hp)}")
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        default = DEFAULT_HPARAMS[k]
        try:
            hp[k] = type(default)(v) if not isinstance(default, bool) else to_bool(v)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"hyperparameter {k}={v!r} is not a valid {type(default).__name__}") from exc
    if hp["epochs"] < 1 or hp["eval_batch_size"] < 1 or hp["width"] < 1:
        raise ConfigError("epochs, eval_batch_size and width must be at least 1 (got "
                          f"{hp['epochs']}, {hp['eval_batch_size']}, {hp['width']})")
    if hp["batch_size"] < 2:
        raise ConfigError(f"batch_size must be at least 2 (got {hp['batch_size']}): the models use BatchNorm, "
                          "which cannot normalise a batch of one image")
    if not (math.isfinite(hp["lr"]) and hp["lr"] > 0):
        raise ConfigError(f"lr must be a positive finite number, got {hp['lr']!r}")
    if not 0 <= hp["warmup_fraction"] < 1:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {hp['warmup_fraction']!r}")
    if not 0 <= hp["label_smoothing"] < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {hp['label_smoothing']!r}")
    if hp["weight_decay"] < 0 or hp["crop_pad"] < 0:
        raise ConfigError(f"weight_decay and crop_pad must be >= 0 (got {hp['weight_decay']}, {hp['crop_pad']})")
    return hp


def lr_factor(step: int, total_steps: int, warmup_fraction: float, *, start: float = 0.1,
              end: float = 0.01) -> float:
    """Multiplier of the peak learning rate for ``step`` (0-based) of ``total_steps``.

    Linear warm-up from ``start`` to 1 over ``ceil(warmup_fraction * total_steps)``
    steps, then linear decay to ``end`` at the last step. Defined for every
    ``total_steps >= 1`` (one step trains at the peak): unlike ``OneCycleLR`` it
    never divides by a phase of zero steps.
    """
    if total_steps < 1:
        raise ConfigError(f"the learning-rate schedule needs at least one step, got {total_steps}")
    step = min(max(step, 0), total_steps - 1)
    warmup = min(math.ceil(warmup_fraction * total_steps), total_steps - 1)
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    decay = total_steps - 1 - warmup
    if decay == 0:
        return 1.0
    return 1.0 + (end - 1.0) * (step - warmup) / decay


def plan_steps(n_train: int, batch_size: int) -> tuple[int, int]:
    """``(steps_per_epoch, images_per_epoch)``; see :func:`nightshift.data.loader.plan_batches`."""
    from nightshift.data.loader import plan_batches

    _bs, steps, images = plan_batches(n_train, batch_size)
    return steps, images


def select_device(require_gpu: bool = False, device: str | None = None):
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if require_gpu:
        raise GPUUnavailable(
            "require_gpu=True but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run this task on a GPU worker "
            "(Celery queue 'gpu' or a Kubernetes pod with nvidia.com/gpu) or set require_gpu=False."
        )
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 NHWC images, in 0..1 units."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = x.std(axis=0)
    return x.mean(axis=0).tolist(), np.where(std < 1e-6, 1.0, std).tolist()


def augment(x, crop_pad: int, flip: bool, gen):
    """Batched augmentation on uint8 NHWC tensors already on the device."""
    import torch

    n, h, w, _ = x.shape
    if crop_pad > 0:
        padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (crop_pad,) * 4).permute(0, 2, 3, 1)
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), device=x.device, generator=gen)
        out = torch.empty_like(x)
        for oy in range(2 * crop_pad + 1):  # one gather per shift, (2p+1)^2 groups in all
            for ox in range(2 * crop_pad + 1):
                m = (dy == oy) & (dx == ox)
                if m.any():
                    out[m] = padded[m, oy:oy + h, ox:ox + w]
        x = out
    if flip:
        m = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(2), x)
    return x


def evaluate(model, images, labels=None, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 accuracy and mean loss of ``model``.

    ``images, labels``: uint8 image and label tensors on the model's device; or
    ``images`` alone: an iterable of such ``(images, labels)`` pairs (shards).
    One host sync at the end, none per batch.
    """
    import torch

    model.eval()
    parts = [(images, labels)] if labels is not None else images
    correct = loss_sum = None
    n = 0
    with torch.inference_mode():
        for x, y in parts:
            for i in range(0, len(y), batch_size):
                logits, _ = model(x[i:i + batch_size])
                yb = y[i:i + batch_size]
                lsum = torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
                hits = (logits.argmax(1) == yb).sum()
                loss_sum = lsum if loss_sum is None else loss_sum + lsum
                correct = hits if correct is None else correct + hits
                n += len(yb)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan")}
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}


def split_channel_stats(snapshot, split: str = "train") -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1 units) of a split, accumulated shard by shard."""
    c = snapshot.image_shape[2]
    total = np.zeros(c)
    sq = np.zeros(c)
    count = 0
    for x, _ in snapshot.iter_split(split):
        px = x.reshape(-1, c).astype(np.float64) / 255.0
        total += px.sum(axis=0)
        sq += (px * px).sum(axis=0)
        count += len(px)
    if count == 0:
        return [0.5] * c, [1.0] * c
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return mean.tolist(), np.where(std < 1e-6, 1.0, std).tolist()


class _Timer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_ev, self.end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self.start_ev.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            import torch

            self.end_ev.record()
            torch.cuda.synchronize()
            return self.start_ev.elapsed_time(self.end_ev) / 1000.0
        return time.perf_counter() - self.t0


def train(snapshot: Snapshot, out_dir: str | Path, hparams: dict[str, Any] | None = None, *,
          require_gpu: bool = False, device: str | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train a classifier on ``snapshot``'s train split; report val and test accuracy.

    :param out_dir: where ``checkpoint.pt`` and ``train_manifest.json`` go (atomic).
    :param hparams: overrides of :data:`DEFAULT_HPARAMS`.
    :param require_gpu: fail with :class:`GPUUnavailable` when no CUDA device is visible.
    :param on_epoch: called with ``(epoch, metrics)`` after every epoch.
    :param should_stop: polled between steps; return True to abort (``on_kill``).
    """
    import torch

    from nightshift.models import Classifier

    hp = resolve_hparams(hparams)
    dev = select_device(require_gpu, device)
    seed_everything(hp["seed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from nightshift.data.loader import make_eval, make_loader

    counts = {s: snapshot.count(s) for s in ("train", "val", "test")}
    if counts["train"] == 0 or counts["test"] == 0:
        raise DataError(f"snapshot {snapshot.digest[:12]} has an empty train or test split "
                        f"({snapshot.manifest['counts']['per_split']}): collect more images "
                        "(splits are drawn by content hash) or raise test_fraction")
    gen = torch.Generator(device=dev).manual_seed(hp["seed"])
    budget = hp["preload_budget_mb"] or None
    train_data = make_loader(snapshot, "train", dev, hp["batch_size"], gen, budget_mb=budget, seed=hp["seed"])
    val_data = make_eval(snapshot, "val", dev, budget_mb=budget)
    test_data = make_eval(snapshot, "test", dev, budget_mb=budget)
    steps_per_epoch, images_per_epoch = train_data.steps, train_data.images_per_epoch
    mean, std = split_channel_stats(snapshot, "train")
    num_classes = len(snapshot.class_names)
    model = Classifier(hp["model"], num_classes, snapshot.image_shape, mean, std, width=hp["width"]).to(dev)
    model = model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model

    total_steps = steps_per_epoch * hp["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, hp["warmup_fraction"]))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=hp["label_smoothing"])
    use_amp = bool(hp["amp"]) and dev.type == "cuda"

    def step(xb, yb):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, _ = model(xb)
            loss = loss_fn(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    history: list[dict[str, float]] = []
    timer = _Timer(dev)
    train_seconds = 0.0
    for epoch in range(1, hp["epochs"] + 1):
        model.train()
        timer.start()
        loss_sum = torch.zeros((), device=dev)
        for xb, yb in train_data.epoch():
            if should_stop and should_stop():
                raise InterruptedError("training stopped on request")
            xb = augment(xb, hp["crop_pad"], hp["flip"], gen)
            loss_sum += step(xb, yb).detach() * len(yb)
        epoch_s = timer.stop()
        train_seconds += epoch_s
        train_loss = loss_sum.item() / images_per_epoch  # one host sync per epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged: the mean training loss of epoch {epoch} is {train_loss} "
                f"(lr={hp['lr']:g}, batch_size={hp['batch_size']}). Lower lr (default "
                f"{DEFAULT_HPARAMS['lr']:g}) and trigger again; a retry with the same settings would diverge again.")
        val = evaluate(model, val_data.batches(), batch_size=hp["eval_batch_size"])
        m = {"train_loss": train_loss, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
             "epoch_seconds": epoch_s, "train_images_per_second": images_per_epoch / max(epoch_s, 1e-9),
             "lr": sched.get_last_lr()[0]}
        history.append({"epoch": epoch, **m})
        if on_epoch:
            on_epoch(epoch, m)

    test = evaluate(model, test_data.batches(), batch_size=hp["eval_batch_size"])
    metrics = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": history[-1]["val_accuracy"], "train_loss": history[-1]["train_loss"],
        "train_seconds": train_seconds,
        "train_images_per_second": images_per_epoch * hp["epochs"] / max(train_seconds, 1e-9),
    }
    model_cpu = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    ckpt = {"model_config": model_cpu.config, "state_dict": model_cpu.state_dict(), "class_names": snapshot.class_names,
            "hparams": hp, "data_digest": snapshot.digest, "metrics": metrics}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    ckpt_path = atomic_write_bytes(out_dir / "checkpoint.pt", buf.getvalue())
    manifest = {
        "data_digest": snapshot.digest, "snapshot": str(snapshot.path), "hparams": hp, "seed": hp["seed"],
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "amp": use_amp, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                     "cuda": torch.version.cuda, "numpy": np.__version__},
        "counts": counts, "data_feed": train_data.mode,
        "metrics": metrics, "history": history,
    }
    atomic_write_json(out_dir / "train_manifest.json", manifest)
    return TrainResult(checkpoint_path=ckpt_path, metrics=metrics, manifest=manifest, history=history)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Nightshift checkpoint: tensors and plain values only.

    ``weights_only=True`` makes :func:`torch.load` refuse anything that would
    run code while unpickling, so a checkpoint path that arrives through XCom
    cannot execute an attacker's objects.

    :raises DataError: the file is missing, is not a checkpoint, or holds
        objects other than tensors and plain values.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; re-run the train_gpu task")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise DataError(f"checkpoint {path} cannot be loaded safely (tensors and plain values only): "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    missing = [k for k in ("model_config", "state_dict", "class_names") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{path} is not a Nightshift checkpoint: it lacks {missing}")
    return ckpt
