"""Data-parallel training (DDP) under ``torchrun``: the few things ``train()`` needs.

No Airflow. ``torchrun --standalone --nproc_per_node=N -m nightshift.train_cli ...``
starts N processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous in
their environment; :func:`init` joins them (NCCL on CUDA, Gloo on CPU) and each
rank drives one GPU (``cuda:LOCAL_RANK``).

The scheme keeps a data-parallel run equal to a single-process run with the same
global batch: every rank draws the same shuffled, augmented global batch (same seed,
same generator) and trains on its own contiguous slice of it
(:func:`rank_slice`); DDP averages the gradients. Only rank 0 writes checkpoints,
the manifest and the result; the others wait at a barrier.

:func:`launch_command` builds the ``torchrun`` command line the operator runs when
a worker sees more than one GPU.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from nightshift.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (``size == 1``: not distributed)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: dict[str, str] | None = None) -> World:
    """The world ``torchrun`` describes in the environment (``WORLD_SIZE`` 1 or unset: single process).

    :raises ConfigError: the variables are inconsistent.
    """
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from exc
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"inconsistent torchrun environment: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local}")
    return World(rank=rank, local_rank=local, size=size)


def init(world: World, device_type: str) -> World:
    """Join the process group (NCCL on CUDA, Gloo on CPU); pins ``cuda:LOCAL_RANK``.

    A no-op for a single process.
    """
    if not world.distributed:
        return world
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                              "visible: start torchrun with --nproc_per_node at most the GPU count")
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(world.rank, world.local_rank, world.size, backend)


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def rank_slice(n: int, world: World) -> slice:
    """This rank's contiguous share of a global batch of ``n`` (sizes differ by at most one)."""
    if not world.distributed:
        return slice(0, n)
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def check_batch(batch_size: int, world: World) -> None:
    """Every rank needs at least two images per step (BatchNorm)."""
    if world.distributed and batch_size < 2 * world.size:
        raise ConfigError(f"batch_size {batch_size} is too small for {world.size} data-parallel processes: each "
                          f"needs at least 2 images per step; use batch_size >= {2 * world.size}")


def all_reduce_sum(tensor: Any, world: World) -> Any:
    """Sum ``tensor`` over the ranks in place (one collective; a no-op for one process)."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(value: Any, world: World) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` for one process)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def wrap(model: Any, world: World, device: Any) -> Any:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model)


def gpu_count() -> int:
    """GPUs this worker sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(nproc: int, module_args: Sequence[str], *, python: str | None = None) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m nightshift.train_cli <args>`` (one node).

    :raises ConfigError: ``nproc < 1``.
    """
    if nproc < 1:
        raise ConfigError(f"nproc_per_node must be at least 1, got {nproc}")
    torchrun = shutil.which("torchrun", path=os.path.dirname(python or sys.executable) + os.pathsep +
                            os.environ.get("PATH", ""))
    head = [torchrun] if torchrun else [python or sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", f"--nproc_per_node={nproc}", "-m", "nightshift.train_cli", *module_args]
