"""The learning-rate range test ("LR finder", Smith 2017): the coarse step of picking a learning rate.

A few hundred training steps while the learning rate grows exponentially from
`min_lr` to `max_lr`, one step per rate, recording the loss smoothed as
torch-lr-finder smooths it. Where the loss falls fastest (`steepest`, the
suggestion torch-lr-finder's plot makes) is a good single learning rate; the
usable range runs from a tenth of it up to the larger of it and a tenth of
the rate at the lowest loss (fastai's "minimum / 10": at the minimum itself
the loss is about to diverge). The fine step is a search inside that range
(`tune.space.train.lr`).

It trains through the loop's own `Run` (the configured model, optimizer,
loss, precision and clipping) with the schedule off, as the ramp is the
schedule. A test holds its curve against torch-lr-finder's `range_test`
(step_mode="exp") on the same model and batches.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import loop
from pipeline.config import LR_FIND_SKIP
from pipeline.errors import UserError

SKIP_START, SKIP_END = LR_FIND_SKIP  # torch-lr-finder's defaults: the first steps are noise, the last diverging


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed, as plotted
    stopped_early: bool  # the loss diverged before max_lr

    def window(self) -> tuple[list[float], list[float]]:
        """(lrs, losses) without the first and last steps, as torch-lr-finder reads and plots them."""
        end = len(self.losses) - SKIP_END
        if end - SKIP_START < 2:
            raise UserError(f"the loss diverged after {len(self.losses)} steps, too few to read a learning rate "
                            f"from (at least {SKIP_START + SKIP_END + 2}); lower lr_find.min_lr")
        return self.lrs[SKIP_START:end], self.losses[SKIP_START:end]

    def steepest(self) -> float:
        """The rate where the smoothed loss falls fastest (torch-lr-finder's suggestion)."""
        lrs, losses = self.window()
        return lrs[int(np.gradient(np.array(losses)).argmin())]

    def minimum(self) -> float:
        """The rate at the lowest smoothed loss."""
        return self.lrs[int(np.argmin(self.losses))]

    def usable(self) -> tuple[float, float]:
        steepest = self.steepest()
        return steepest / 10, max(steepest, self.minimum() / 10)

    def summary(self) -> dict:
        low, high = self.usable()
        return {"steepest": self.steepest(), "minimum": self.minimum(), "usable": [low, high],
                "steps": len(self.lrs), "stopped_early": self.stopped_early}


def range_test(run: loop.Run, device: torch.device, min_lr: float = 1e-7, max_lr: float = 10.0,
               steps: int = 100, smooth: float = 0.05, diverge: float = 5.0) -> RangeTest:
    """Train `run` for up to `steps` batches (its batches epoch after epoch), the learning rate going from
    `min_lr` to `max_lr` geometrically; stop once the smoothed loss exceeds `diverge` times its best. Each
    parameter group keeps its ratio to train.lr (a pretrained backbone's train.backbone_lr)."""
    borrowed_cfg, borrowed_weights = run.cfg, copy.deepcopy(run.model.state_dict())
    try:
        return _sweep(run, device, min_lr, max_lr, steps, smooth, diverge)
    finally:  # the model goes back as it came (its optimizer and schedule are this test's own: `Run.start`)
        run.model.load_state_dict(borrowed_weights)
        run.cfg = borrowed_cfg


def _sweep(run: loop.Run, device: torch.device, min_lr: float, max_lr: float, steps: int, smooth: float,
           diverge: float) -> RangeTest:
    run.cfg = run.cfg.model_copy(update={"scheduler": "none", "resume": False})
    run.start(device)
    ratios = [group["lr"] / run.cfg.lr for group in run.optimizer.param_groups]
    dtype = run.dtype(device)
    batches = itertools.chain.from_iterable(itertools.repeat(run.train_batches))
    lrs, losses, best = [], [], math.inf
    run.model.train()
    for step in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (step / (steps - 1))
        for group, ratio in zip(run.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        inputs, labels = next(batches)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = run.criterion(run.model(inputs), labels)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.step()
        value = loss.item()
        if not losses and not math.isfinite(value):
            raise UserError(f"the loss is {value} on the first batch, before any learning rate acted: the model "
                            f"gives non-finite outputs on this data; check its weights and inputs")
        if losses and smooth > 0:
            value = smooth * value + (1 - smooth) * losses[-1]
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
        if not math.isfinite(value) or value > diverge * best:
            return RangeTest(lrs, losses, stopped_early=True)
    return RangeTest(lrs, losses, stopped_early=False)
