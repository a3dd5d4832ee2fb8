"""Multi-process training helpers: `torchrun` environment, a resumable DistributedSampler."""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import torch
import torch.distributed as dist
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


def init_from_env(device_kind: str) -> DistContext:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo",
                                rank=ctx.rank, world_size=ctx.world_size)
    return ctx


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

