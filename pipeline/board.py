"""TensorBoard: each training run's and trial's curves as event files, for those who watch runs there.

A `loop.Callback` like the MLflow one, so the loop stays ignorant of it. Each
seed replicate and each search trial writes to its own folder,
`<repo>/runs/<experiment>/<its MLflow run name>`, which TensorBoard lists as
one run; `make ui` serves the folder. The scalars carry the loop's own
names (`EpochMetrics`: train_loss, val_accuracy, lr, ...), stepped by epoch, the
same names MLflow gets; the HParams tab compares runs by their config (a search's
trials by their searched params and the value each is judged on).

`evaluate` adds a folder per evaluated model, `evaluate-<run>`, with its test
confusion matrix and its training curves as images.

A resumed run continues its folder: the event files of the interrupted process
hold epochs after the resume point that the run trains again, and
`purge_step` tells TensorBoard to drop those.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import loop, paths
from pipeline.config import Config, flatten
from pipeline.metrics import EpochMetrics

FLUSH_SECONDS = 10  # a run being watched shows its epochs within this long


def run_dir(cfg: Config, run_name: str) -> Path:
    """A run's folder: runs/<experiment>/<its MLflow run name>."""
    return paths.tensorboard_dir() / cfg.experiment / run_name


def add_pictures(log_dir: Path, pictures: dict[str, Path]) -> None:
    """Figures a stage drew (a model's test confusion matrix, its curves) as images of the TensorBoard run in
    `log_dir`, replacing what an earlier run of the stage put there."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir), purge_step=0) as writer:
        for tag, path in pictures.items():
            with Image.open(path) as picture:
                writer.add_image(tag, np.asarray(picture.convert("RGB")), 0, dataformats="HWC")


class TensorBoard(loop.Callback):
    """Scalars per epoch, and once per run a grid of training images (uint8, N x C x H x W), its config as text
    and (when it ends) its hparams with the best epoch's validation numbers."""

    def __init__(self, log_dir: Path, cfg: Config, images: torch.Tensor | None = None,
                 hparams: dict[str, Any] | None = None):
        """`hparams`: what the HParams table compares runs on (a trial's searched params); default the whole
        config, flattened."""
        self.log_dir, self.cfg, self.images, self.writer = log_dir, cfg, images, None
        self.hparams = hparams if hparams is not None else {
            key: value for key, value in flatten(cfg.public()).items() if value is not None}

    def on_fit_start(self, model: nn.Module, history: list[EpochMetrics]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a fresh start drops whatever an earlier run of this config left here, a resumed one the
        # epochs it trains again
        self.writer = SummaryWriter(str(self.log_dir), purge_step=len(history), flush_secs=FLUSH_SECONDS)
        if not history:
            if self.images is not None:
                self.writer.add_images("inputs", self.images.cpu(), 0)
            self.writer.add_text("config", f"```\n{self.cfg.public_yaml()}\n```", 0)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        for name, value in asdict(m).items():
            if name != "epoch":
                self.writer.add_scalar(name, value, m.epoch)

    def on_fit_end(self, result: loop.FitResult) -> None:
        best = result.best
        self.writer.add_hparams(
            {key: value if isinstance(value, (bool, int, float, str)) else str(value)
             for key, value in self.hparams.items()},
            {"hparam/best_val_loss": best.val_loss, "hparam/best_val_accuracy": best.val_accuracy,
             "hparam/best_epoch": result.best_epoch, f"hparam/score_{self.cfg.train.monitor}": result.best_score},
            run_name=".")  # into this run's own folder, not a subfolder of its own
        self.close()

    def close(self) -> None:
        """Flush and close (also for a run that ended early, e.g. a pruned trial)."""
        if self.writer is not None:
            self.writer.close()

