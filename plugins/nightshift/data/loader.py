"""Feeding a split of a sharded snapshot to a training loop on any device.

:func:`make_loader` preloads the split onto the device as uint8 when it fits the
budget (the fastest path: batches are slices of one tensor, shuffled on the
device with no host sync) and otherwise streams it shard by shard: a
background thread reads the next shard from disk into pinned host memory
while the device trains on the current one, and each shard is copied to the
device with one non-blocking transfer. Both paths yield the same kind of
batches, ``(uint8 NHWC images, int64 labels)`` on the device, and the same
code runs on CPU.

Streaming shuffles the order of shards every epoch and the images within each
shard (the standard sharded-dataset shuffle); a batch may span two shards.

Resumable: the order of an epoch depends only on state a checkpoint can restore.
The shard order of epoch ``e`` is drawn from ``(seed, e)`` alone, and every
permutation within the device is drawn from the caller's ``torch.Generator``
(whose state the trainer saves), consumed in a fixed order on the caller's
thread; the prefetch thread only reads files in the order it is given.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterator

import numpy as np

from nightshift.errors import ConfigError, DataError

#: Default share of the free memory (device memory on CUDA, available RAM on CPU)
#: a preloaded training split may take.
DEFAULT_BUDGET_FRACTION = 0.5


def free_memory_bytes(device) -> int:
    """Free device memory (CUDA) or available RAM (CPU)."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def plan_batches(n: int, batch_size: int) -> tuple[int, int, int]:
    """``(batch size, steps per epoch, images per epoch)`` for ``n`` images.

    A batch larger than the split is clipped to the split. A trailing batch of
    a single image is dropped (BatchNorm cannot normalise one value per channel
    once the feature map is 1×1), so every step sees at least two images.
    """
    if n < 2:
        raise DataError(f"the train split has {n} image(s); training needs at least 2. "
                        "Collect more images or lower val_fraction/test_fraction.")
    bs = min(batch_size, n)
    steps, rest = divmod(n, bs)
    if rest >= 2:
        steps += 1
    return bs, steps, (n if rest != 1 else n - 1)


class PreloadedSplit:
    """The whole split on the device; batches are on-device shuffled slices."""

    mode = "preload"

    def __init__(self, images: np.ndarray, labels: np.ndarray, device, batch_size: int, generator):
        import torch

        self.device = device
        self.x = torch.as_tensor(images).to(device, non_blocking=True)
        self.y = torch.as_tensor(labels, dtype=torch.long).to(device, non_blocking=True)
        self.n = len(labels)
        self.batch_size, self.steps, self.images_per_epoch = plan_batches(self.n, batch_size)
        self.gen = generator

    def epoch(self, number: int | None = None) -> Iterator[tuple[Any, Any]]:
        """One pass; the order comes from the generator alone (``number`` is unused)."""
        import torch

        perm = torch.randperm(self.n, device=self.device, generator=self.gen)
        bs = self.batch_size
        for s in range(self.steps):
            idx = perm[s * bs:min((s + 1) * bs, self.images_per_epoch)]
            yield self.x[idx], self.y[idx]


class StreamedSplit:
    """The split read shard by shard with one shard prefetched into pinned memory."""

    mode = "stream"

    def __init__(self, snapshot, split: str, device, batch_size: int, generator, *, seed: int = 0,
                 prefetch: int = 1):
        self.snapshot = snapshot
        self.split = split
        self.device = device
        self.gen = generator
        self.seed = seed
        self._epochs = 0  # epochs started, for callers that do not number them
        self.prefetch = max(1, prefetch)
        self.shards = []  # (index, count in this split)
        for i, d in enumerate(snapshot.shard_digests):
            count = int((snapshot.shard(i).splits == split).sum())
            if count:
                self.shards.append((i, count))
        self.n = sum(c for _, c in self.shards)
        self.batch_size, self.steps, self.images_per_epoch = plan_batches(self.n, batch_size)

    def _read(self, index: int):
        import torch

        sh = self.snapshot.shard(index)
        mask = sh.splits == self.split
        x = torch.from_numpy(np.ascontiguousarray(sh.images[mask]))
        y = torch.from_numpy(sh.labels[mask].astype(np.int64))
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _host_shards(self, order: list[int]) -> Iterator[tuple[Any, Any]]:
        """Shards read by a background thread, at most ``prefetch`` ahead."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader() -> None:
            try:
                for i in order:
                    if stop.is_set():
                        return
                    q.put(("ok", self._read(i)))
                q.put(("end", None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(("error", exc))

        t = threading.Thread(target=reader, name="nightshift-shard-reader", daemon=True)
        t.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)

    def shard_order(self, number: int) -> list[int]:
        """The shard order of epoch ``number`` (1-based): a function of ``(seed, number)`` only."""
        order = [i for i, _ in self.shards]
        np.random.default_rng((self.seed & 0xFFFFFFFF, 0x5EED, int(number))).shuffle(order)
        return order

    def epoch(self, number: int | None = None) -> Iterator[tuple[Any, Any]]:
        """One pass over the split; ``number`` (1-based) fixes the shard order (default: the next)."""
        import torch

        self._epochs = self._epochs + 1 if number is None else int(number)
        order = self.shard_order(self._epochs)
        bs, emitted, steps = self.batch_size, 0, 0
        carry_x = carry_y = None
        for hx, hy in self._host_shards(order):
            x = hx.to(self.device, non_blocking=True)
            y = hy.to(self.device, non_blocking=True)
            perm = torch.randperm(len(y), device=self.device, generator=self.gen)
            x, y = x[perm], y[perm]
            if carry_x is not None:
                x, y = torch.cat([carry_x, x]), torch.cat([carry_y, y])
            full = len(y) // bs
            for s in range(full):
                if steps == self.steps:
                    return
                take = min(bs, self.images_per_epoch - emitted)
                yield x[s * bs:s * bs + take], y[s * bs:s * bs + take]
                emitted += take
                steps += 1
            carry_x, carry_y = x[full * bs:], y[full * bs:]
        if carry_x is not None and len(carry_y) >= 2 and steps < self.steps:
            yield carry_x, carry_y


def make_loader(snapshot, split: str, device, batch_size: int, generator, *, budget_mb: float | None = None,
                seed: int = 0, mode: str | None = None):
    """Preload ``split`` when it fits ``budget_mb`` (default: half the free memory), else stream it.

    :param mode: ``"preload"`` or ``"stream"`` to force the feed whatever the budget (a
        resumed run keeps the feed of the run it resumes: the shuffle order depends on it).
    :raises ConfigError: a negative budget, an unknown mode.
    """
    if mode is not None and mode not in ("preload", "stream"):
        raise ConfigError(f"data feed mode must be 'preload' or 'stream', got {mode!r}")
    h, w, c = snapshot.image_shape
    need = snapshot.count(split) * h * w * c
    if budget_mb is None:
        budget = DEFAULT_BUDGET_FRACTION * free_memory_bytes(device)
    elif budget_mb < 0 or not math.isfinite(budget_mb):
        raise ConfigError(f"preload_budget_mb must be a non-negative number, got {budget_mb}")
    else:
        budget = budget_mb * 2**20
    if mode == "preload" or (mode is None and need <= budget):
        x, y = snapshot.split(split)
        return PreloadedSplit(x, y, device, batch_size, generator)
    return StreamedSplit(snapshot, split, device, batch_size, generator, seed=seed)


class EvalSplit:
    """A split for evaluation: preloaded on the device, or read shard by shard."""

    def __init__(self, snapshot, split: str, device, preload: bool):
        import torch

        self.snapshot, self.split, self.device = snapshot, split, device
        self.mode = "preload" if preload else "stream"
        self._x = self._y = None
        if preload:
            x, y = snapshot.split(split)
            self._x = torch.as_tensor(x).to(device, non_blocking=True)
            self._y = torch.as_tensor(y, dtype=torch.long).to(device, non_blocking=True)

    def batches(self) -> Iterator[tuple[Any, Any]]:
        import torch

        if self._x is not None:
            yield self._x, self._y
            return
        for x, y in self.snapshot.iter_split(self.split):
            yield (torch.from_numpy(x).to(self.device, non_blocking=True),
                   torch.from_numpy(y.astype(np.int64)).to(self.device, non_blocking=True))


def make_eval(snapshot, split: str, device, *, budget_mb: float | None = None) -> EvalSplit:
    """Preload an evaluation split when it fits ``budget_mb`` (default half the free memory)."""
    h, w, c = snapshot.image_shape
    need = snapshot.count(split) * h * w * c
    budget = DEFAULT_BUDGET_FRACTION * free_memory_bytes(device) if budget_mb is None else budget_mb * 2**20
    return EvalSplit(snapshot, split, device, preload=need <= budget)
