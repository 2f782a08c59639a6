"""The configured optimizer and learning-rate schedule of a run (torch.optim's own classes)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> Iterable[nn.Parameter] | list[dict]:
    """All parameters at train.lr, or a pretrained backbone (a model's `backbone`) at train.backbone_lr.

    A frozen backbone stays in the optimizer: with no gradients it is skipped, and unfreezing needs no new one.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or cfg.backbone_lr is None:
        return model.parameters()
    inside = {id(parameter) for parameter in backbone.parameters()}
    # the head first: the lr the loop reports (param_groups[0]) is train.lr's schedule
    return [{"params": [parameter for parameter in model.parameters() if id(parameter) not in inside]},
            {"params": list(backbone.parameters()), "lr": cfg.backbone_lr}]


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels where PyTorch has them (one kernel per step instead of a few per
    parameter, and as deterministic)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Returns (scheduler or None, steps per batch?)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), False
    if cfg.scheduler == "plateau":
        mode = "max" if cfg.monitor == "val_accuracy" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma,
                                                          patience=max(1, cfg.patience // 2)), False
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), False
    if cfg.scheduler == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]  # each group peaks at its own lr
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=cfg.epochs * steps_per_epoch
                                                   ), True
    return None, False
