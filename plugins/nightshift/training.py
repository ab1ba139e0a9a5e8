"""Training: ``train(snapshot, out_dir, hparams) -> TrainResult``, usable as a library.

airbench-style: the whole split is preloaded onto the device as uint8, augmentation
is batched on the device, mixed precision (bf16 autocast) on CUDA, a warm-up step
before timing, CUDA-event timing on GPU. No Airflow, no MLflow here: the caller
gets per-epoch metrics through ``on_epoch`` and logs them where it likes.

Restartable: the whole training state goes to ``last.pt`` after every epoch and a
later call with the same ``out_dir`` resumes from it (see :func:`train`).
"""

from __future__ import annotations

import io
import logging
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nightshift.artifacts import atomic_write_bytes, atomic_write_json
from nightshift.contracts import TRAIN_MANIFEST_FILE
from nightshift.data.snapshot import Snapshot
from nightshift.errors import (CheckpointMismatch, ConfigError, DataError, DeviceOutOfMemory, GPUUnavailable,
                               TrainingDiverged)
from nightshift.settings import to_bool

logger = logging.getLogger("nightshift.training")

#: Hyperparameters with their units. Unknown keys are rejected. ``None`` (and
#: ``"auto"``) means "chosen from the input size and the model" by
#: :func:`recipe_defaults`: images of 16 px and up get the speed-record recipe
#: (``fast_cnn``, batch 1024, SGD-Nesterov, EMA, flip + translate, TTA); smaller
#: ones (the bundled 8×8 digits) the small recipe (``small_cnn``, batch 128, AdamW).
DEFAULT_HPARAMS: dict[str, Any] = {
    "model": "auto",           # fast_cnn | small_cnn | resnet18 | auto (fast_cnn for images >= 16 px, else small_cnn)
    "width": None,             # channels of the first block (None: fast_cnn 64, small_cnn 32; resnet18 ignores it)
    "epochs": None,            # passes over the training split (None: 10 for >= 16 px, 12 below)
    "batch_size": None,        # images per step (None: 1024 for >= 16 px, 128 below)
    "optimizer": "auto",       # sgd (Nesterov) | adamw | auto (sgd for fast_cnn, adamw otherwise)
    "lr": None,                # peak learning rate on the batch-mean loss (None: sgd 1.5, adamw 3e-3)
    "momentum": 0.85,          # SGD Nesterov momentum (sgd only)
    "bias_lr_scale": None,     # lr multiplier for BatchNorm shifts (None: sgd 64, adamw 1)
    "warmup_fraction": None,   # share of all steps spent warming up, 0 = start at the peak (None: 0.2 / 0.25)
    "weight_decay": None,      # sgd: share of each weight removed per step at the peak lr (None: 2e-3);
                               # adamw: decoupled coefficient, times lr (None: 5e-4)
    "label_smoothing": None,   # cross-entropy label smoothing (None: 0.2 for >= 16 px, 0.1 below)
    "crop_pad": None,          # random translation, pixels each way, reflected edges, 0 = off (None: 2 / 1)
    "flip": None,              # random horizontal flips (None: on for >= 16 px; off for digits/text)
    "cutout": 0,               # side of a random zeroed square, pixels (0 = off)
    "ema": None,               # per-step decay of the weight average that is evaluated and saved, 0 = off (None: 0.97 / 0)
    "tta": None,               # test-time augmentation for test_accuracy_tta: 0 off, 1 mirror, 2 mirror + 1-px shifts (None: 2 / 0)
    "compile": False,          # torch.compile the training model (first step slower; CUDA mainly)
    "seed": 0,                 # torch/numpy/python RNG seed
    "amp": True,               # bf16 autocast on CUDA (ignored on CPU)
    "eval_batch_size": 1024,   # images per evaluation step
    "preload_budget_mb": 0.0,  # MiB a split may take on the device to be preloaded; 0 = half the free memory
}

_TYPES: dict[str, type] = {
    "model": str, "width": int, "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "momentum": float,
    "bias_lr_scale": float, "warmup_fraction": float, "weight_decay": float, "label_smoothing": float,
    "crop_pad": int, "flip": bool, "cutout": int, "ema": float, "tta": int, "compile": bool, "seed": int,
    "amp": bool, "eval_batch_size": int, "preload_budget_mb": float,
}
MODELS = ("fast_cnn", "small_cnn", "resnet18")
OPTIMIZERS = ("sgd", "adamw")
#: Images whose shorter side is at least this many pixels get the speed-record recipe.
LARGE_IMAGE_PX = 16


def recipe_defaults(image_shape: tuple[int, ...] | list[int], hp: dict[str, Any]) -> dict[str, Any]:
    """The values that ``None``/``"auto"`` stand for, given the image shape and the other choices."""
    h, w = int(image_shape[0]), int(image_shape[1])
    large = min(h, w) >= LARGE_IMAGE_PX
    d: dict[str, Any] = ({"model": "fast_cnn", "epochs": 10, "batch_size": 1024, "warmup_fraction": 0.2,
                          "label_smoothing": 0.2, "crop_pad": 2, "flip": True, "ema": 0.97, "tta": 2}
                         if large else
                         {"model": "small_cnn", "epochs": 12, "batch_size": 128, "warmup_fraction": 0.25,
                          "label_smoothing": 0.1, "crop_pad": 1, "flip": False, "ema": 0.0, "tta": 0})
    model = d["model"] if hp.get("model") in (None, "auto") else hp["model"]
    d["model"] = model
    d["width"] = {"fast_cnn": 64, "small_cnn": 32}.get(model, 64)
    opt = ("sgd" if model == "fast_cnn" else "adamw") if hp.get("optimizer") in (None, "auto") else hp["optimizer"]
    d["optimizer"] = opt
    d.update({"lr": 1.5, "weight_decay": 2e-3, "bias_lr_scale": 64.0} if opt == "sgd"
             else {"lr": 3e-3, "weight_decay": 5e-4, "bias_lr_scale": 1.0})
    return d


@dataclass
class TrainResult:
    checkpoint_path: Path
    metrics: dict[str, float]
    manifest: dict[str, Any]
    history: list[dict[str, float]]


def resolve_hparams(overrides: dict[str, Any] | None,
                    image_shape: tuple[int, ...] | list[int] | None = None) -> dict[str, Any]:
    """Defaults + ``overrides``, type-checked; with ``image_shape``, every ``None``/``"auto"``
    is replaced by :func:`recipe_defaults`. Without it, those stay unresolved (validation only).

    :raises ConfigError: an unknown key, a value of the wrong type or out of range.
    """
    hp = dict(DEFAULT_HPARAMS)
    unknown = sorted(set(overrides or {}) - set(hp))
    if unknown:
        raise ConfigError(f"unknown hyperparameter(s) {unknown}; known: {sorted(hp)}")
    for k, v in (overrides or {}).items():
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null") and _TYPES[k] is not str):
            continue
        kind = _TYPES[k]
        try:
            hp[k] = to_bool(v) if kind is bool else kind(v)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"hyperparameter {k}={v!r} is not a valid {kind.__name__}") from exc
    if image_shape is not None:
        for k, v in recipe_defaults(image_shape, hp).items():
            if hp.get(k) in (None, "auto"):
                hp[k] = v
    _check_ranges(hp)
    return hp


def _check_ranges(hp: dict[str, Any]) -> None:
    def given(*keys: str) -> bool:
        return all(hp[k] is not None for k in keys)

    if hp["model"] not in (*MODELS, "auto"):
        raise ConfigError(f"model must be one of {[*MODELS, 'auto']}, got {hp['model']!r}")
    if hp["optimizer"] not in (*OPTIMIZERS, "auto"):
        raise ConfigError(f"optimizer must be one of {[*OPTIMIZERS, 'auto']}, got {hp['optimizer']!r}")
    for k in ("epochs", "eval_batch_size", "width"):
        if hp[k] is not None and hp[k] < 1:
            raise ConfigError(f"epochs, eval_batch_size and width must be at least 1 (got {k}={hp[k]})")
    if given("batch_size") and hp["batch_size"] < 2:
        raise ConfigError(f"batch_size must be at least 2 (got {hp['batch_size']}): the models use BatchNorm, "
                          "which cannot normalise a batch of one image")
    if given("lr") and not (math.isfinite(hp["lr"]) and hp["lr"] > 0):
        raise ConfigError(f"lr must be a positive finite number, got {hp['lr']!r}")
    if given("bias_lr_scale") and not (math.isfinite(hp["bias_lr_scale"]) and hp["bias_lr_scale"] > 0):
        raise ConfigError(f"bias_lr_scale must be a positive finite number, got {hp['bias_lr_scale']!r}")
    if not 0 <= hp["momentum"] < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {hp['momentum']!r}")
    if given("warmup_fraction") and not 0 <= hp["warmup_fraction"] < 1:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {hp['warmup_fraction']!r}")
    if given("label_smoothing") and not 0 <= hp["label_smoothing"] < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {hp['label_smoothing']!r}")
    if given("ema") and not 0 <= hp["ema"] < 1:
        raise ConfigError(f"ema must be in [0, 1) (0 = off), got {hp['ema']!r}")
    if given("tta") and hp["tta"] not in (0, 1, 2):
        raise ConfigError(f"tta must be 0 (off), 1 (mirror) or 2 (mirror + 1-px shifts), got {hp['tta']!r}")
    for k in ("weight_decay", "crop_pad", "cutout"):
        if hp[k] is not None and hp[k] < 0:
            raise ConfigError(f"weight_decay, crop_pad and cutout must be >= 0 (got {k}={hp[k]})")


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


def _reflect(i, size: int):
    """Reflect indices into ``[0, size)`` (edge pixel not repeated), as reflect padding does."""
    i = i.abs()
    return ((size - 1) - ((size - 1) - i).abs()).clamp_(0, size - 1)


def shift_flip(x, dy, dx, flip=None):
    """``x`` (uint8 NHWC) translated by ``(dy, dx)`` pixels per image with reflected
    edges, and mirrored where ``flip`` is True: ONE gather, no padding copy, no host sync.

    :param dy, dx: integer tensors of shape ``(N, 1)`` (or broadcastable to it).
    :param flip: bool tensor ``(N, 1)`` or None.
    """
    import torch

    n, h, w, c = x.shape
    dev = x.device
    rows = _reflect(torch.arange(h, device=dev).view(1, h) - dy, h)            # (N|1, H)
    cols = torch.arange(w, device=dev).view(1, w)
    if flip is not None:
        cols = torch.where(flip, (w - 1) - cols, cols)                         # (N, W)
    cols = _reflect(cols - dx, w)
    base = (torch.arange(n, device=dev) * (h * w)).view(n, 1, 1)
    idx = base + rows.view(-1, h, 1) * w + cols.view(-1, 1, w)                   # (N, H, W)
    return x.reshape(n * h * w, c)[idx.view(-1)].view(n, h, w, c)


def augment(x, crop_pad: int, flip: bool, gen, cutout: int = 0):
    """Batched augmentation of uint8 NHWC images already on the device.

    Each image is translated by a uniform ``(dy, dx)`` in ``[-crop_pad, crop_pad]``
    (reflected edges, as a random crop of a reflect-padded image), mirrored with
    probability 1/2 when ``flip``, then a ``cutout``-pixel square is zeroed at a
    uniform centre when ``cutout > 0``. Random numbers come from ``gen`` on the
    device; the whole batch is one gather (and one masked fill): no host syncs,
    a fixed number of kernels whatever the batch.
    """
    import torch

    n, h, w, _ = x.shape
    dev = x.device
    if crop_pad > 0 or flip:
        if crop_pad > 0:
            dy = torch.randint(-crop_pad, crop_pad + 1, (n, 1), device=dev, generator=gen)
            dx = torch.randint(-crop_pad, crop_pad + 1, (n, 1), device=dev, generator=gen)
        else:
            dy = dx = torch.zeros((1, 1), dtype=torch.long, device=dev)
        fl = (torch.rand((n, 1), device=dev, generator=gen) < 0.5) if flip else None
        x = shift_flip(x, dy, dx, fl)
    if cutout > 0:
        cy = torch.randint(0, h, (n, 1, 1), device=dev, generator=gen) - cutout // 2
        cx = torch.randint(0, w, (n, 1, 1), device=dev, generator=gen) - cutout // 2
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        m = (ys >= cy) & (ys < cy + cutout) & (xs >= cx) & (xs < cx + cutout)
        x = x.masked_fill(m.unsqueeze(-1), 0)
    return x


def tta_logits(model, x, level: int, flip: bool):
    """Logits averaged over test-time views: level 1 adds the mirror image (when
    ``flip``), level 2 adds 1-pixel shifts up-left and down-right (weights ½, ¼, ¼)."""
    import torch

    def views(xb):
        out = model(xb)[0].float()
        if level >= 1 and flip:
            out = 0.5 * (out + model(xb.flip(2))[0].float())
        return out

    logits = views(x)
    if level >= 2:
        one = torch.ones((1, 1), dtype=torch.long, device=x.device)
        logits = 0.5 * logits + 0.25 * (views(shift_flip(x, one, one)) + views(shift_flip(x, -one, -one)))
    return logits


def evaluate(model, images, labels=None, batch_size: int = 1024, *, tta: int = 0,
             flip: bool = False, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy and mean loss of ``model`` (with ``tta``: see :func:`tta_logits`).

    ``images, labels``: uint8 image and label tensors on the model's device; or
    ``images`` alone: an iterable of such ``(images, labels)`` pairs (shards).
    With ``num_classes``, also ``"confusion"``: a ``num_classes × num_classes`` list of
    int lists, rows = true class, columns = predicted class, accumulated on the
    device. One host sync at the end, none per batch.
    """
    import torch

    model.eval()
    parts = [(images, labels)] if labels is not None else images
    correct = loss_sum = cm = None
    n = 0
    with torch.inference_mode():
        for x, y in parts:
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                logits = tta_logits(model, xb, tta, flip) if tta else model(xb)[0]
                lsum = torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
                pred = logits.argmax(1)
                hits = (pred == yb).sum()
                loss_sum = lsum if loss_sum is None else loss_sum + lsum
                correct = hits if correct is None else correct + hits
                if num_classes:
                    if cm is None:
                        cm = torch.zeros(num_classes * num_classes, dtype=torch.long, device=yb.device)
                    # index_add_, not bincount: CUDA bincount reads the max on the host (a sync per batch)
                    cm.index_add_(0, yb * num_classes + pred, torch.ones_like(yb))
                n += len(yb)
    out: dict[str, Any] = ({"accuracy": float("nan"), "loss": float("nan")} if n == 0 else
                           {"accuracy": correct.item() / n, "loss": loss_sum.item() / n})
    if num_classes:
        out["confusion"] = ([[0] * num_classes for _ in range(num_classes)] if cm is None else
                            cm.view(num_classes, num_classes).cpu().tolist())
    return out


def split_channel_stats(snapshot, split: str = "train") -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1 units) of a split, accumulated shard by shard."""
    c = snapshot.image_shape[2]
    total = np.zeros(c, np.int64)  # exact integer sums: no float copy of the split
    sq = np.zeros(c, np.int64)
    count = 0
    for x, _ in snapshot.iter_split(split):
        px = x.reshape(-1, c)
        total += px.sum(axis=0, dtype=np.int64)
        sq += np.square(px, dtype=np.uint32).sum(axis=0, dtype=np.int64)
        count += len(px)
    if count == 0:
        return [0.5] * c, [1.0] * c
    mean = total / (count * 255.0)
    std = np.sqrt(np.maximum(sq / (count * 255.0 ** 2) - mean * mean, 0.0))
    return mean.tolist(), np.where(std < 1e-6, 1.0, std).tolist()


def _sample(snapshot, split: str, n: int) -> np.ndarray:
    """Up to ``n`` images of ``split``, read shard by shard (whitening statistics)."""
    parts, have = [], 0
    for x, _ in snapshot.iter_split(split):
        parts.append(x[:n - have])
        have += len(parts[-1])
        if have >= n:
            break
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, *snapshot.image_shape), np.uint8)


def make_optimizer(model, hp: dict[str, Any]):
    """SGD-Nesterov or AdamW. With ``bias_lr_scale != 1`` BatchNorm shifts form a
    second group at ``lr * bias_lr_scale``. SGD's decay is decoupled from the lr: each
    step removes ``weight_decay × schedule`` of every weight, whatever the group's lr."""
    import torch

    lr, wd, scale = hp["lr"], hp["weight_decay"], hp["bias_lr_scale"]
    params = [p for p in model.parameters() if p.requires_grad]
    bn_bias = [m.bias for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None and m.bias.requires_grad]
    groups = [(params, lr)]
    if scale != 1.0 and bn_bias:
        ids = {id(p) for p in bn_bias}
        groups = [([p for p in params if id(p) not in ids], lr), (bn_bias, lr * scale)]
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD([{"params": ps, "lr": g_lr, "weight_decay": wd / g_lr} for ps, g_lr in groups],
                               momentum=hp["momentum"], nesterov=hp["momentum"] > 0)
    return torch.optim.AdamW([{"params": ps, "lr": g_lr} for ps, g_lr in groups], weight_decay=wd)


class WeightEMA:
    """An exponential moving average of a model's weights and BatchNorm statistics.

    Updated every ``every`` steps with ``min(decay, (1 + step) / (10 + step)) ** every``
    (so early steps are not dominated by the random initialisation): one fused
    ``lerp`` over all floating tensors, no host sync.
    """

    def __init__(self, model, decay: float, every: int = 5):
        import copy

        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        src, dst = model.state_dict(), self.model.state_dict()
        keys = [k for k, v in src.items() if v.is_floating_point()]
        self._src = [src[k] for k in keys]
        self._dst = [dst[k] for k in keys]

    def update(self, step: int, *, force: bool = False) -> None:
        """Called after every step (0-based); averages on every ``every``-th and when ``force``."""
        import torch

        if (step + 1) % self.every and not force:
            return
        weight = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step)) ** self.every
        with torch.no_grad():
            if hasattr(torch, "_foreach_lerp_"):
                torch._foreach_lerp_(self._dst, self._src, weight)
            else:  # pragma: no cover - very old torch
                for d, s_ in zip(self._dst, self._src):
                    d.lerp_(s_, weight)


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


#: The resume checkpoint written after every epoch, next to ``checkpoint.pt``.
LAST_CHECKPOINT = "last.pt"
#: Layout version of ``last.pt``; a file of another version is refused, not guessed at.
RESUME_FORMAT = "nightshift.last/1"
#: Hyperparameters that do not change the trained weights, so a resumed run may
#: differ in them: evaluation batching, where the split lives (the feed itself is
#: kept from the checkpoint) and test-time augmentation (computed at the end).
#: Every other hyperparameter must equal the checkpoint's.
RESUME_FREE_HPARAMS = frozenset({"eval_batch_size", "preload_budget_mb", "tta"})


def _rng_state(gen, dev) -> dict[str, Any]:
    """Every random state the loop draws from, as tensors and plain values (``weights_only``-safe)."""
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np.asarray(np_keys, np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else [],
        "generator": gen.get_state(), "generator_device": dev.type,
    }


def _set_rng_state(state: dict[str, Any], gen, dev, seed: int, epoch: int) -> None:
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and state["cuda"] and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["generator_device"] == dev.type:
        gen.set_state(state["generator"])
    else:  # a CPU generator's state cannot seed a CUDA one (or back): continue from a derived seed
        gen.manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        logger.warning("resuming on %s a run that was started on %s: the augmentation and shuffle streams "
                       "restart from a derived seed, so the result is not bit-identical to an "
                       "uninterrupted run", dev.type, state["generator_device"])


def read_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a ``last.pt`` (tensors and plain values only).

    :raises DataError: the file is truncated, corrupt, or not a resume checkpoint of this format.
    """
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and weights-only errors all mean "unreadable"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"the resume checkpoint {path} cannot be read ({type(exc).__name__}: {first}). "
                        f"It is damaged, so training does not guess; delete it to train this run from "
                        f"epoch 1: rm {path}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != RESUME_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{path} is not a resume checkpoint of format {RESUME_FORMAT!r} (found {found!r}); "
                        f"delete it to train this run from epoch 1: rm {path}")
    missing = [k for k in ("epoch", "global_step", "hparams", "model_config", "data_digest", "class_names",
                           "state_dict", "optimizer", "scheduler", "rng", "history", "data_feed")
               if k not in ckpt]
    if missing:
        raise DataError(f"the resume checkpoint {path} lacks {missing}; delete it to train this run "
                        f"from epoch 1: rm {path}")
    return ckpt


def _resume_differences(last: dict[str, Any], hp: dict[str, Any], snapshot, model_config=None) -> list[str]:
    """What differs between a ``last.pt`` and this run, one readable item each."""
    diffs = []
    if last["data_digest"] != snapshot.digest:
        diffs.append(f"data digest: checkpoint {str(last['data_digest'])[:12]}, this run {snapshot.digest[:12]}")
    if list(last["class_names"]) != list(snapshot.class_names):
        diffs.append(f"classes: checkpoint {len(last['class_names'])} {list(last['class_names'])[:10]}, "
                     f"this run {len(snapshot.class_names)} {list(snapshot.class_names)[:10]}")
    for k in sorted((set(hp) | set(last["hparams"])) - RESUME_FREE_HPARAMS):
        a, b = last["hparams"].get(k, "<absent>"), hp.get(k, "<absent>")
        if a != b:
            diffs.append(f"hparam {k}: checkpoint {a!r}, this run {b!r}")
    if model_config is not None:
        for k in sorted(set(model_config) | set(last["model_config"])):
            a, b = last["model_config"].get(k, "<absent>"), model_config.get(k, "<absent>")
            if a != b:
                diffs.append(f"model_config {k}: checkpoint {a!r}, this run {b!r}")
    return diffs


def _refuse_mismatch(path: Path, diffs: list[str]) -> None:
    if diffs:
        raise CheckpointMismatch(
            f"the resume checkpoint {path} was written by a different training run: {'; '.join(diffs)}. "
            f"Nothing was overwritten. Resuming it would mix two runs; delete it to train this run "
            f"from epoch 1 (rm {path}), or run with the settings and data it was written with.")


def _device_description(dev) -> str:
    import torch

    from nightshift.data.loader import free_memory_bytes

    try:
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            return (f"{torch.cuda.get_device_name(dev)} ({total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now, "
                    f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB peak allocated by this run)")
        return f"{dev.type} ({free_memory_bytes(dev) / 2**30:.1f} GiB RAM available now)"
    except Exception:  # noqa: BLE001 - describing the device must not hide the out-of-memory error
        return str(dev)


@dataclass
class _Progress:
    """What a training run is doing now, for the out-of-memory message (:func:`_oom_message`):
    the phase, and what was chosen so far."""

    phase: str = "setting up"
    hp: dict[str, Any] | None = None
    device: Any = None
    data_feed: str | None = None
    resumed_from: str | None = None


def _oom_message(where: _Progress, exc: BaseException) -> str:
    hp, dev = where.hp or {}, where.device
    first = str(exc).splitlines()[0] if str(exc) else ""
    budget = hp.get("preload_budget_mb")
    return (f"out of device memory while {where.phase} on "
            f"{_device_description(dev) if dev is not None else 'the device'} with batch_size={hp.get('batch_size')}, "
            f"model={hp.get('model')} width={hp.get('width')}, "
            f"preload_budget_mb={budget or '0 (half the free memory)'} ({where.data_feed or 'feed not chosen yet'}). "
            f"Lower batch_size (and eval_batch_size={hp.get('eval_batch_size')} if it failed while evaluating), "
            f"set a smaller preload_budget_mb so the split is streamed instead of preloaded, or a smaller width; "
            f"a retry with the same settings needs the same memory."
            + (f" This run resumed {where.resumed_from}, which fixes the feed it started with; delete that "
               f"file to let the budget choose again." if where.resumed_from else "")
            + f" ({type(exc).__name__}: {first})")


def _eta(seconds: float) -> str:
    import datetime

    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def train(snapshot: Snapshot, out_dir: str | Path, hparams: dict[str, Any] | None = None, *,
          require_gpu: bool = False, device: str | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          should_stop: Callable[[], bool] | None = None, resume: bool = True,
          evaluate_test: bool = True) -> TrainResult:
    """Train a classifier on ``snapshot``'s train split; report val and test accuracy.

    Restartable: after every epoch the whole training state goes to ``out_dir/last.pt``
    (atomically); with ``resume`` a later call with the same ``out_dir`` continues
    after the last finished epoch, and on CPU ends bit-identical to an uninterrupted
    run. A ``last.pt`` of other settings or data is refused (:class:`CheckpointMismatch`),
    a damaged one too (:class:`DataError`); both name the file to delete.

    :param out_dir: where ``checkpoint.pt``, ``last.pt`` and ``train_manifest.json`` go (atomic).
    :param hparams: overrides of :data:`DEFAULT_HPARAMS`.
    :param require_gpu: fail with :class:`GPUUnavailable` when no CUDA device is visible.
    :param on_epoch: called with ``(epoch, metrics)`` after every epoch (after ``last.pt`` is
        written). A resumed run first replays the recorded metrics of the epochs it skips.
    :param should_stop: polled between steps; return True to abort (``on_kill``).
    :param resume: continue from ``out_dir/last.pt`` when there is one; False starts over
        (and overwrites it).
    :param evaluate_test: False is a sweep trial's mode: the test split is never read (no
        ``test_*`` metrics; the manifest's confusion matrix is the val split's, its
        ``confusion_split`` says so). The test split stays untouched until a winner is chosen
        on validation; :func:`evaluate_checkpoint` scores the winner on it afterwards.
    :raises TrainingDiverged: the loss became NaN/inf (names the epoch and step; the
        previous epoch's ``last.pt`` is kept).
    :raises DeviceOutOfMemory: the device ran out of memory (says what to lower).

    Data-parallel under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`nightshift.distributed`):
    each process drives ``cuda:LOCAL_RANK`` (or the CPU, with Gloo), draws the same
    shuffled and augmented global batch of ``batch_size`` images and trains on its
    share; DDP averages the gradients. Only rank 0 calls ``on_epoch``, logs progress
    and writes ``last.pt``, ``checkpoint.pt`` and the manifest; every rank returns the
    same metrics.
    """
    import torch

    from nightshift import distributed

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    where = _Progress()
    world = distributed.from_env()
    try:
        return _train(snapshot, Path(out_dir), hparams, require_gpu=require_gpu, device=device, on_epoch=on_epoch,
                      should_stop=should_stop, resume=resume, where=where, world=world,
                      evaluate_test=evaluate_test)
    except oom as exc:
        raise DeviceOutOfMemory(_oom_message(where, exc)) from exc
    finally:
        distributed.shutdown(world)


def _train(snapshot: Snapshot, out_dir: Path, hparams: dict[str, Any] | None, *, require_gpu: bool,
           device: str | None, on_epoch, should_stop, resume: bool, where: _Progress, world,
           evaluate_test: bool = True) -> TrainResult:
    """:func:`train`'s body: set up, load the splits, build (or restore) the model, run the
    epochs, evaluate and write the checkpoint. ``where`` follows the phase for error messages."""
    from nightshift.lineage import environment_manifest

    t_begin = time.perf_counter()
    hp = where.hp = resolve_hparams(hparams, snapshot.image_shape)
    h, w, _c = snapshot.image_shape
    if hp["crop_pad"] >= min(h, w) or hp["cutout"] > min(h, w):
        raise ConfigError(f"crop_pad ({hp['crop_pad']}) must be smaller than, and cutout ({hp['cutout']}) at most, "
                          f"the image side ({min(h, w)} px)")
    dev, world = _place(hp, require_gpu, device, world)
    where.device = dev
    seed_everything(hp["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_manifest()
    last_path = out_dir / LAST_CHECKPOINT
    last = read_resume_checkpoint(last_path) if resume and last_path.is_file() else None
    if last is not None:  # settings and data first: refuse before reading any pixels
        _refuse_mismatch(last_path, _resume_differences(last, hp, snapshot))
        where.resumed_from = str(last_path)
    data = _load_splits(snapshot, hp, dev, world, last, evaluate_test, where)
    where.phase = "building the model"
    run = _build(snapshot, hp, dev, world, steps_per_epoch=data.train.steps)
    if last is not None:
        _refuse_mismatch(last_path, _resume_differences(last, hp, snapshot, run.model.config))
        where.phase = f"restoring {last_path}"
        _restore(run, last, last_path, data, env)
        if on_epoch and world.is_main:  # a retry's fresh MLflow run gets the whole curve
            for rec in run.history:
                on_epoch(int(rec["epoch"]), {k: v for k, v in rec.items() if k != "epoch"})
        del last  # the states are in the model and optimizer now; free the copy
    _run_epochs(run, snapshot, data, last_path, env, world, where, t_begin=t_begin, on_epoch=on_epoch,
                should_stop=should_stop)
    return _finish(run, snapshot, data, out_dir, env, world, where)


def _place(hp: dict[str, Any], require_gpu: bool, device: str | None, world):
    """The device this process trains on, and the data-parallel group it joined (if any)."""
    import torch

    from nightshift import distributed

    dev = select_device(require_gpu, device)
    if world.distributed:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", world.local_rank)
        world = distributed.init(world, dev.type)
        distributed.check_batch(hp["batch_size"], world)
        logger.info("data-parallel: rank %d of %d on %s (%s)", world.rank, world.size, dev, world.backend)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev, world


@dataclass
class _Splits:
    """The data one run trains and evaluates on (``test`` is None in a sweep trial)."""

    train: Any
    val: Any
    test: Any
    counts: dict[str, int]
    gen: Any


def _load_splits(snapshot: Snapshot, hp: dict[str, Any], dev, world, last: dict[str, Any] | None,
                 evaluate_test: bool, where: _Progress) -> _Splits:
    import torch

    from nightshift import distributed
    from nightshift.data.loader import make_eval, make_loader

    counts = {s: snapshot.count(s) for s in ("train", "val", "test")}
    held_out = "test" if evaluate_test else "val"  # a sweep trial needs val (its winner is picked on it)
    if counts["train"] == 0 or counts[held_out] == 0:
        raise DataError(f"snapshot {snapshot.digest[:12]} has an empty train or {held_out} split "
                        f"({snapshot.manifest['counts']['per_split']}): collect more images "
                        f"(splits are drawn by content hash) or raise {held_out}_fraction")
    gen = torch.Generator(device=dev).manual_seed(hp["seed"])
    budget = hp["preload_budget_mb"] or None
    where.phase = "loading the train split onto the device"
    train_data = make_loader(snapshot, "train", dev, hp["batch_size"], gen, budget_mb=budget, seed=hp["seed"],
                             mode=last["data_feed"] if last is not None else None)
    where.data_feed = f"train split {train_data.mode}ed"
    if world.distributed:  # each rank chose by its own free memory; different feeds = different batches
        modes = distributed.all_gather_object(train_data.mode, world)
        if len(set(modes)) > 1:
            raise ConfigError(f"the data-parallel ranks chose different data feeds {modes} (each by its own free "
                              "memory): set preload_budget_mb so that every rank preloads, or to a value below "
                              "the split's size so that every rank streams")
    where.phase = "loading the val and test splits onto the device" if evaluate_test else "loading the val split"
    val_data = make_eval(snapshot, "val", dev, budget_mb=budget)
    test_data = make_eval(snapshot, "test", dev, budget_mb=budget) if evaluate_test else None
    return _Splits(train_data, val_data, test_data, counts, gen)


@dataclass
class _Run:
    """The model, its optimizer and schedule, and the counters :func:`_save_last` records."""

    hp: dict[str, Any]
    dev: Any
    model: Any
    ema: Any
    opt: Any
    sched: Any
    step: Callable[[Any, Any], Any]
    use_amp: bool
    total_steps: int
    history: list[dict[str, float]]
    train_seconds: float = 0.0
    first_step_seconds: float | None = None
    global_step: int = 0
    start_epoch: int = 1
    resumed_from: dict[str, Any] | None = None

    @property
    def evaluated(self):
        """The weights that are evaluated, saved and exported: the EMA's when there is one."""
        return self.ema.model if self.ema is not None else self.model


def _build(snapshot: Snapshot, hp: dict[str, Any], dev, world, *, steps_per_epoch: int) -> _Run:
    import torch

    from nightshift import distributed
    from nightshift.models import Classifier

    mean, std = split_channel_stats(snapshot, "train")
    model = Classifier(hp["model"], len(snapshot.class_names), snapshot.image_shape, mean, std, width=hp["width"])
    if hasattr(model.net, "init_whitening"):
        model.net.init_whitening(model.preprocess(torch.from_numpy(_sample(snapshot, "train", 5000))))
    model = model.to(dev)
    model = model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model
    total_steps = steps_per_epoch * hp["epochs"]
    opt = make_optimizer(model, hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, hp["warmup_fraction"]))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=hp["label_smoothing"])
    use_amp = bool(hp["amp"]) and dev.type == "cuda"
    ema = WeightEMA(model, hp["ema"]) if hp["ema"] > 0 else None
    ddp = distributed.wrap(model, world, dev)  # the model itself when not distributed
    fwd = torch.compile(ddp) if hp["compile"] else ddp

    def step(xb, yb):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, _ = fwd(xb)
            loss = loss_fn(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    return _Run(hp=hp, dev=dev, model=model, ema=ema, opt=opt, sched=sched, step=step, use_amp=use_amp,
                total_steps=total_steps, history=[])


def _restore(run: _Run, last: dict[str, Any], last_path: Path, data: _Splits, env: dict[str, Any]) -> None:
    """Continue after ``last``'s epoch: weights, EMA, optimizer, schedule, RNG and counters."""
    hp = run.hp
    run.model.load_state_dict(last["state_dict"])
    if run.ema is not None:
        run.ema.model.load_state_dict(last["ema_state_dict"])
    run.opt.load_state_dict(last["optimizer"])
    run.sched.load_state_dict(last["scheduler"])
    _set_rng_state(last["rng"], data.gen, run.dev, hp["seed"], int(last["epoch"]))
    run.history = [dict(h) for h in last["history"]]
    run.train_seconds = float(last["train_seconds"])
    run.first_step_seconds = last["first_step_seconds"]
    run.global_step = int(last["global_step"])
    run.start_epoch = int(last["epoch"]) + 1
    run.resumed_from = {"epoch": int(last["epoch"]), "git_sha": last.get("environment", {}).get("git_sha"),
                        "versions": last.get("environment", {}).get("versions")}
    if (run.resumed_from["git_sha"], run.resumed_from["versions"]) != (env["git_sha"], env["versions"]):
        logger.warning("resuming %s written by other code or versions (git %s, %s); this run: git %s, %s",
                       last_path, run.resumed_from["git_sha"], run.resumed_from["versions"], env["git_sha"],
                       env["versions"])
    logger.info("resuming from %s: epoch %d/%d done (global step %d); continuing at epoch %d",
                last_path, last["epoch"], hp["epochs"], run.global_step, run.start_epoch)


def _save_last(run: _Run, snapshot: Snapshot, data: _Splits, epoch: int, last_path: Path, env: dict[str, Any]) -> None:
    """The whole training state after ``epoch``, atomically (outside the epoch timer); rank 0 only."""
    import torch

    hp = run.hp
    state = {
        "format": RESUME_FORMAT, "epoch": epoch, "global_step": run.global_step, "epochs": hp["epochs"],
        "hparams": hp, "model_config": run.model.config, "class_names": list(snapshot.class_names),
        "data_digest": snapshot.digest, "data_feed": data.train.mode,
        "state_dict": run.model.state_dict(),
        "ema_state_dict": run.ema.model.state_dict() if run.ema is not None else None,
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "rng": _rng_state(data.gen, run.dev),
        "history": run.history, "train_seconds": run.train_seconds, "first_step_seconds": run.first_step_seconds,
        "environment": {"git_sha": env["git_sha"], "versions": env["versions"]},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(last_path, buf.getvalue())


def _run_epochs(run: _Run, snapshot: Snapshot, data: _Splits, last_path: Path, env: dict[str, Any], world,
                where: _Progress, *, t_begin: float, on_epoch, should_stop) -> None:
    """Train from ``run.start_epoch`` to the last epoch; after each, validate, write ``last.pt``
    and call ``on_epoch``. Raises :class:`TrainingDiverged` on a non-finite loss."""
    import torch

    from nightshift import distributed

    hp, dev, main = run.hp, run.dev, world.is_main
    timer = _Timer(dev)
    step_losses = torch.empty(data.train.steps, device=dev)  # per-step losses of one epoch, read once at its end
    mark = time.perf_counter()
    for epoch in range(run.start_epoch, hp["epochs"] + 1):
        where.phase = f"training (epoch {epoch}/{hp['epochs']})"
        run.model.train()
        timer.start()
        sizes: list[int] = []
        step_before = run.global_step
        for xb, yb in data.train.epoch(epoch):
            if should_stop and should_stop():
                raise InterruptedError("training stopped on request")
            xb = augment(xb, hp["crop_pad"], hp["flip"], data.gen, hp["cutout"])
            if world.distributed:  # every rank augmented the same global batch; each trains on its share
                if len(yb) < 2 * world.size:  # a short trailing batch: some rank would get < 2 images
                    continue  # (BatchNorm); every rank sees the same length, so all skip it together
                share = distributed.rank_slice(len(yb), world)
                sizes.append(len(yb))
                xb, yb = xb[share], yb[share]
            else:
                sizes.append(len(yb))
            step_losses[len(sizes) - 1] = run.step(xb, yb).detach()
            if run.ema is not None:
                run.ema.update(run.global_step, force=run.global_step == run.total_steps - 1)
            run.global_step += 1
            if run.first_step_seconds is None:  # the only sync inside the loop, once per run
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                run.first_step_seconds = time.perf_counter() - t_begin
        epoch_s = timer.stop()
        run.train_seconds += epoch_s
        if world.distributed:  # the mean over the ranks' shares: one collective per epoch
            distributed.all_reduce_sum(step_losses, world).div_(world.size)
        losses = step_losses[:len(sizes)].double().cpu().numpy()  # one host sync per epoch
        train_loss = float(np.dot(losses, sizes)) / max(sum(sizes), 1)
        if not math.isfinite(train_loss):
            _diverged(losses, sizes, epoch, step_before, run, snapshot, last_path)
        where.phase = f"evaluating the val split (epoch {epoch})"
        val = evaluate(run.evaluated, data.val.batches(), batch_size=hp["eval_batch_size"])
        now = time.perf_counter()
        wall = now - mark  # this epoch's training and validation + the previous one's checkpoint and callback
        mark = now
        walls = [r["epoch_wall_seconds"] for r in run.history if "epoch_wall_seconds" in r] + [wall]
        eta = sum(walls) / len(walls) * (hp["epochs"] - epoch)
        m = {"train_loss": train_loss, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
             "epoch_seconds": epoch_s, "train_images_per_second": data.train.images_per_epoch / max(epoch_s, 1e-9),
             "lr": run.sched.get_last_lr()[0], "epoch_wall_seconds": wall, "eta_seconds": eta}
        run.history.append({"epoch": epoch, **m})
        where.phase = f"writing {last_path}"
        if main:
            _save_last(run, snapshot, data, epoch, last_path, env)
            logger.info("epoch %d/%d  loss %.3f  val_acc %.3f  %s img/s  ETA %s", epoch, hp["epochs"], train_loss,
                        val["accuracy"], f"{m['train_images_per_second']:,.0f}", _eta(eta))
            if on_epoch:
                on_epoch(epoch, m)


def _diverged(losses: np.ndarray, sizes: list[int], epoch: int, step_before: int, run: _Run, snapshot: Snapshot,
              last_path: Path) -> None:
    hp = run.hp
    bad = int(np.flatnonzero(~np.isfinite(losses))[0]) if not np.isfinite(losses).all() else len(losses) - 1
    kept = (f"the last good checkpoint, {last_path} (epoch {epoch - 1}), is kept" if epoch > 1
            else "no epoch finished, so no checkpoint was written")
    raise TrainingDiverged(
        f"training diverged: the loss became {losses[bad]} at epoch {epoch}/{hp['epochs']}, "
        f"step {bad + 1}/{len(sizes)} of the epoch (global step {step_before + bad + 1} of {run.total_steps}) "
        f"(lr={hp['lr']:g}, batch_size={hp['batch_size']}). Lower lr (default for this recipe "
        f"{recipe_defaults(snapshot.image_shape, hp)['lr']:g}) and trigger again; "
        f"a retry with the same settings would diverge again; {kept}.")


def _finish(run: _Run, snapshot: Snapshot, data: _Splits, out_dir: Path, env: dict[str, Any], world,
            where: _Progress) -> TrainResult:
    """Evaluate the final weights (test split, or val in a sweep trial), write ``checkpoint.pt``
    and the manifest (rank 0), and return the result."""
    import torch

    from nightshift import distributed

    hp, dev, history = run.hp, run.dev, run.history
    model = run.evaluated
    num_classes = len(snapshot.class_names)
    if data.test is not None:
        where.phase = "evaluating the test split"
        test = evaluate(model, data.test.batches(), batch_size=hp["eval_batch_size"], num_classes=num_classes)
        confusion = test["confusion"]
    else:  # a sweep trial: the confusion matrix of the val split; the test split is never read
        where.phase = "evaluating the val split (confusion matrix)"
        test = None
        confusion = evaluate(model, data.val.batches(), batch_size=hp["eval_batch_size"],
                             num_classes=num_classes)["confusion"]
    images_per_epoch = data.train.images_per_epoch
    steady = [r["epoch_seconds"] for r in history[1:]] or [history[0]["epoch_seconds"]]
    metrics = {
        **({"test_accuracy": test["accuracy"], "test_loss": test["loss"]} if test is not None else {}),
        "val_accuracy": history[-1]["val_accuracy"], "train_loss": history[-1]["train_loss"],
        "train_seconds": run.train_seconds,
        "train_images_per_second": images_per_epoch * hp["epochs"] / max(run.train_seconds, 1e-9),
        "steady_images_per_second": images_per_epoch * len(steady) / max(sum(steady), 1e-9),
        "first_step_seconds": float(run.first_step_seconds or 0.0),
    }
    if hp["tta"] and data.test is not None:
        tta = evaluate(model, data.test.batches(), batch_size=hp["eval_batch_size"], tta=hp["tta"], flip=hp["flip"])
        metrics.update({"test_accuracy_tta": tta["accuracy"], "test_loss_tta": tta["loss"]})
    resumed_from = run.resumed_from
    manifest = {
        "data_digest": snapshot.digest, "snapshot": str(snapshot.path), "hparams": hp, "seed": hp["seed"],
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "amp": run.use_amp, "git_sha": env["git_sha"], "git_dirty": env["git_dirty"], "versions": env["versions"],
        "packages": env["packages"], "counts": data.counts, "data_feed": data.train.mode,
        "metrics": metrics, "history": history,
        "epoch_wall_seconds": [r.get("epoch_wall_seconds") for r in history],
        "resumed_from_epoch": resumed_from["epoch"] if resumed_from else None, "resumed_from": resumed_from,
        "class_names": list(snapshot.class_names), "confusion_matrix": confusion,
        "confusion_split": "test" if test is not None else "val", "evaluated_test": test is not None,
        "world_size": world.size, "distributed_backend": world.backend,
    }
    model_cpu = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    ckpt = {"model_config": model_cpu.config, "state_dict": model_cpu.state_dict(), "class_names": snapshot.class_names,
            "hparams": hp, "data_digest": snapshot.digest, "metrics": metrics, "manifest": manifest}
    ckpt_path = out_dir / "checkpoint.pt"
    if world.is_main:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        ckpt_path = atomic_write_bytes(ckpt_path, buf.getvalue())
        atomic_write_json(out_dir / TRAIN_MANIFEST_FILE, manifest)
    distributed.barrier(world)  # the other ranks return once rank 0's files are there
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


def evaluate_checkpoint(snapshot: Snapshot, checkpoint_path: str | Path, split: str = "test", *,
                        device: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Score a saved checkpoint on one split of ``snapshot``: ``{split}_accuracy``, ``{split}_loss``
    (and ``{split}_accuracy_tta``/``{split}_loss_tta`` when its recipe used TTA), plus
    ``confusion`` (rows = true class). What :func:`train` reports for the test split, for a
    model trained without reading it (a sweep trial, scored once it has won on validation).

    :raises DataError: the checkpoint cannot be loaded, was trained on other classes, or the
        split is empty.
    """
    from nightshift.data.loader import make_eval
    from nightshift.models import classifier_from_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    if list(ckpt["class_names"]) != list(snapshot.class_names):
        raise DataError(f"checkpoint {checkpoint_path} was trained on classes {ckpt['class_names']}, the snapshot "
                        f"{snapshot.digest[:12]} has {snapshot.class_names}")
    if snapshot.count(split) == 0:
        raise DataError(f"snapshot {snapshot.digest[:12]} has an empty {split} split: nothing to score on")
    hp = dict(ckpt.get("hparams") or {})
    dev = select_device(False, device)
    model = classifier_from_checkpoint(ckpt).to(dev)
    data = make_eval(snapshot, split, dev, budget_mb=hp.get("preload_budget_mb") or None)
    bs = int(batch_size or hp.get("eval_batch_size") or 1024)
    res = evaluate(model, data.batches(), batch_size=bs, num_classes=len(snapshot.class_names))
    out: dict[str, Any] = {f"{split}_accuracy": res["accuracy"], f"{split}_loss": res["loss"],
                           "confusion": res["confusion"]}
    if hp.get("tta"):
        tta = evaluate(model, data.batches(), batch_size=bs, tta=int(hp["tta"]), flip=bool(hp.get("flip")))
        out.update({f"{split}_accuracy_tta": tta["accuracy"], f"{split}_loss_tta": tta["loss"]})
    return out
