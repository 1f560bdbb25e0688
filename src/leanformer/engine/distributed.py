"""Multi-process training under `torchrun`: process-group setup and a deterministic sharded sampler.

`torchrun --nproc_per_node N -m leanformer train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we join the
group (gloo on CPU, nccl on GPU). The sampler gives every global batch the same samples whatever
the number of processes, so N processes train exactly like one with the same global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")


def _wants_cuda(device: str) -> bool:
    """"auto": CUDA where there is a GPU; "cuda" without one is an error (not a silent run on the CPU)."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ValueError("device='cuda' but no CUDA GPU is available here (torch.cuda.is_available() is False); "
                         "use device 'cpu' or 'auto'")
    return available and device != "cpu"


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment; a single process otherwise. ``device``:
    "auto" (a GPU where there is one), "cpu" or "cuda" (one GPU per process, by torchrun's LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = _wants_cuda(device)
    if world_size <= 1:
        return DistContext(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """This process's place in the torchrun group inside the block (a single process without torchrun), on
    ``device`` (see `init_distributed`). The group is joined if it is not yet and then left at the end: nested
    blocks (a job calling `fit`) share it."""
    joined = dist.is_available() and dist.is_initialized()
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        if not joined:
            shutdown_distributed(ctx)


def sum_across_processes(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of a few numbers over all processes (float64, so counts stay exact)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard(batch, rank: int, world_size: int):
    """This process's slice of a global batch: every tensor of ``batch`` (nested in tuples, lists and dicts) cut
    along its first dimension into ``world_size`` equal parts; other values are kept as they are."""
    if world_size == 1:
        return batch
    if torch.is_tensor(batch):
        if batch.dim() == 0 or batch.shape[0] % world_size:
            raise ValueError(f"a batch of {batch.shape[0] if batch.dim() else 0} examples cannot be split evenly "
                             f"over {world_size} processes: make the batch size a multiple of {world_size}")
        local = batch.shape[0] // world_size
        return batch[rank * local:(rank + 1) * local]
    if isinstance(batch, Mapping):
        return {key: shard(value, rank, world_size) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(value, rank, world_size) for value in batch)
    return batch


class ShardedEpochSampler(Sampler[int]):
    """Shuffled indices for one process, reshuffled per epoch from (seed, epoch).

    Each global batch of `global_batch` indices is cut into `world_size` consecutive slices and
    this process takes slice `rank`. The trailing partial global batch is dropped (training) or,
    with `shuffle=False, drop_last=False` (evaluation), the indices are dealt out round-robin.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size:
            raise ValueError(f"batch_size={global_batch} must be divisible by the number of processes ({world_size})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._indices()
        if not self.drop_last:
            return iter(order[self.rank :: self.world_size])
        local = self.global_batch // self.world_size
        usable = len(order) - len(order) % self.global_batch
        mine = []
        for start in range(0, usable, self.global_batch):
            mine.extend(order[start + self.rank * local : start + (self.rank + 1) * local])
        return iter(mine)

    def __len__(self) -> int:
        if not self.drop_last:
            return len(range(self.rank, self.num_samples, self.world_size))
        return (self.num_samples // self.global_batch) * (self.global_batch // self.world_size)
