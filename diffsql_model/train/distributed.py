"""Multi-process training helpers: `torchrun` environment, DDP wrapping, a resumable
DistributedSampler."""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_kind: str, timeout: datetime.timedelta | None = None) -> DistContext:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA.

    On CUDA the process is bound to GPU LOCAL_RANK before anything touches CUDA, so every later
    context (DataLoader pin-memory thread, NCCL, the RNG) lives on its own GPU and not all on GPU 0.
    `timeout` bounds every collective (torch's default when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return ctx
    if device_kind == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timeout, device_id=torch.device("cuda", ctx.local_rank))
    else:
        dist.init_process_group(backend="gloo", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timeout)
    return ctx


def has_running_stats(module: nn.Module) -> bool:
    """Whether `module` holds buffers that change in training (BatchNorm running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in module.modules())


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP replica of `module` on `device`. All ranks start from rank 0's parameters and buffers;
    buffers are re-sent from rank 0 before every forward only where running statistics exist (the
    ResNet encoders' BatchNorm): constant buffers (image normalisation, SD's null-text embedding)
    stay equal on every rank without it."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               forward_sync_buffers=has_running_stats(module))


def all_reduce_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise max of `tensor` over all ranks, in place (itself when not distributed)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start part-way
    into an epoch, so a resumed run sees exactly the samples an uninterrupted run would."""

    def __init__(self, dataset, ctx: DistContext, seed: int, shuffle: bool = True, drop_last: bool = True):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        """Skip the first `start_index` indices of this rank's shard in the current epoch."""
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start_index:]
        self.start_index = 0  # only the first (resumed) epoch is partial
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start_index

