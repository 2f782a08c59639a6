"""Data-parallel training on several processes (torch.distributed), the way torchrun starts them.

`python -m pipeline train --nproc N` relaunches itself through torchrun (torch.distributed.run); so does
`torchrun --nproc-per-node N -m pipeline train ...`. Each rank holds the whole (small) dataset, walks the same
seeded permutation and augmentation as a single process would, and trains on its own slice of every global batch
(train.batch_size samples in all); DistributedDataParallel averages the gradients, and the loss is scaled so
that the average equals the single-process gradient of the whole batch. Rank 0 alone writes outputs,
checkpoints and MLflow runs; every rank resumes from the same resume point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """This process's place among the ranks torchrun started (one rank when not started by torchrun)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group (gloo on CPU, nccl on CUDA); each CUDA rank takes the GPU of its local rank."""
    world = current()
    if not world.distributed:
        return world, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """DistributedDataParallel, with BatchNorm synchronised across ranks where PyTorch can (SyncBatchNorm is
    CUDA-only: on CPU each rank normalises its own slice of the batch)."""
    if not world.distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m pipeline ARGV` on `nproc` ranks through torchrun; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "--module", "pipeline", *argv])
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        return next((code for code in codes if code in (2, 130, 143)), codes[0] if codes else 1)
    return 0
