"""Where and how a run computes: the device, CPU threads, precision, memory format and seeds.

Every run, trial and rank sets itself up through these, so a run's numbers
depend on its config and this machine's kind, never on who started it.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import torch
from torch import nn

from pipeline import processes
from pipeline.config import TrainConfig
from pipeline.errors import UserError


def thread_count(requested: int | None, sharing: int, available: int, env: str | None) -> int:
    """CPU threads for one of `sharing` processes training at once: `requested`, else an equal share of the
    `available` cores (at most OMP_NUM_THREADS, `env`, when set). Processes that each take every core
    oversubscribe them, and their threads then mostly wait for each other."""
    if requested:
        return requested
    share = max(1, available // max(1, sharing))
    return min(share, int(env)) if env and env.isdigit() and int(env) > 0 else share


def set_threads(requested: int | None, sharing: int = 1) -> int:
    """Pin torch's CPU threads for this process (see `thread_count`); returns the number."""
    threads = thread_count(requested, sharing, processes.available_cores(), os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """train.device as a torch device; asking for a device this machine lacks is a user error."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name}, but this machine has no CUDA device; use auto or cpu")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps, but MPS (Apple GPU) is not available here; use auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device, convolutional: bool = True) -> torch.dtype | None:
    """None means full fp32. `auto`: bf16 on CUDA when supported, else fp16 (with a grad scaler); on a CPU with
    native bf16 instructions, bf16 for models with convolutions (they are compute-bound there, and bf16 halves
    the work at the same accuracy) and fp32 for the others (memory-bound: the casts cost more than they save);
    fp32 on other CPUs and MPS. `make bench` measures both."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and convolutional and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX-512 BF16 or AMX compute bf16 in hardware; elsewhere bf16 autocast only emulates it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def uses_channels_last(cfg: TrainConfig, model: nn.Module) -> bool:
    """`auto`: channels_last for models with convolutions (the layout oneDNN's and cuDNN's fastest kernels take)."""
    if cfg.channels_last == "auto":
        return has_convolutions(model)
    return bool(cfg.channels_last)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for torch
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic and torch.cuda.is_available():
        # CPU kernels are already deterministic; the switch (and its 2 s of imports) matters for CUDA.
        # cuBLAS needs this before its first use to pick reproducible kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
