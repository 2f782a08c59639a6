"""Training one config: what the `train` stage, every Optuna trial and `reproduce` share.

`setup` gives every run the same seeded start (model, batches on the device);
`resume_key` says which resume point belongs to a run; `tracked_run` opens an
MLflow run when tracking is on and costs nothing (not even MLflow's import)
when it is off. The loop itself stays ignorant of all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from functools import cache
from pathlib import Path

import torch

from pipeline import batching, data, devices, distributed, loop, models
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.metrics import EpochMetrics, is_better

LOG_SECONDS = "PIPELINE_LOG_SECONDS"


def setup(cfg: Config, prepared: data.PreparedData, device: torch.device,
          world: distributed.World = distributed.World()):
    """Seeded model and (train, val) batches on `device`: the same start for `train`, every trial and every rank
    (which takes its own slice of each training batch)."""
    if world.distributed and cfg.model.unfreeze_after:
        raise UserError("model.unfreeze_after with several processes: DistributedDataParallel cannot start "
                        "training parameters it did not train before; unfreeze in one process or fine-tune all")
    devices.seed_everything(cfg.seed, cfg.train.deterministic)
    model = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
    models.start_from_weights(model, cfg.model)
    mean, std = models.input_stats(cfg.model, prepared.mean, prepared.std)
    train_batches, val_batches = batching.training_batches(
        dataclasses.replace(prepared, mean=mean, std=std), cfg.train.batch_size, cfg.data.augment, cfg.seed, device,
        drop_last=cfg.train.drop_last, channels_last=devices.uses_channels_last(cfg.train, model),
        shard=(world.rank, world.size), workers=cfg.data.loader_workers)
    if len(train_batches) == 0:  # else the loop would report a nan loss, naming the wrong cause
        raise UserError(f"train.batch_size {cfg.train.batch_size} with train.drop_last: the {len(prepared.train)} "
                        "training images make no full batch; lower train.batch_size or set train.drop_last=false")
    return model, train_batches, val_batches


@cache
def code_version() -> str:
    """Hash of the pipeline's source and torch's version: a resume point made by other code is not resumed."""
    digest = hashlib.sha256(torch.__version__.encode())
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def replicate_configs(cfg: Config) -> list[Config]:
    """A config's seed replicates: `cfg.replicates` copies with seeds seed, seed+1, ... They vary what the seed
    varies (initialisation, data order, augmentation, dropout), never the data split (data.split_seed)."""
    return [cfg.with_overrides({"seed": cfg.seed + index}, source="replicates") for index in range(cfg.replicates)]


def shipped(cfg: Config, results: list[loop.FitResult]) -> int:
    """Which replicate ships: the best on the monitored validation metric (the first of equals). Never chosen by
    the test set, which stays for judging it."""
    best = 0
    for index, result in enumerate(results):
        if is_better(cfg.train.monitor, result.best_score, results[best].best_score):
            best = index
    return best


def resume_key(cfg: Config, data_md5: str) -> str:
    """Names a run's resume point: same config, same prepared data and same code, or it is another run's."""
    return f"{cfg.fingerprint()}-{data_md5[:8]}-{code_version()[:8]}"


def resume_keys(cfg: Config, data_md5: str) -> list[str]:
    """Each seed replicate's resume point: <key>-r<index> (a single run's is the key itself)."""
    key = resume_key(cfg, data_md5)
    return [f"{key}-r{index}" for index in range(cfg.replicates)] if cfg.replicates > 1 else [key]


def summary(cfg: Config, results: list[loop.FitResult], ships: int, model: torch.nn.Module) -> dict:
    """The outcome as metrics.json holds it: the shipped replicate's, then each validation value's mean and std
    over the replicates. Deterministic (no timings), so re-runs change nothing."""
    import numpy as np

    result = results[ships]
    best = result.best
    spread = {}
    for key in ("val_loss", "val_accuracy"):
        values = np.array([getattr(each.best, key) for each in results])
        spread |= {f"{key}_mean": float(values.mean()),
                   f"{key}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return {
        "model": cfg.model.name, "seed": cfg.seed + ships, "replicates": len(results),
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_accuracy": best.train_accuracy, "val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
        # a train/val gap that keeps growing is the classic over-fitting signal
        "generalization_gap": best.train_accuracy - best.val_accuracy,
        **spread,
        "parameters": models.count_parameters(model),
    }


def tracked_run(cfg: Config, name: str, role: str, data_md5: str, **options):
    """An MLflow run (tracking.enabled; see tracking.TrackedRun for `options`) or a context yielding None."""
    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    from pipeline import tracking

    return tracking.TrackedRun(cfg, name, role, data_md5, **options)


def log_seconds() -> float:
    """PIPELINE_LOG_SECONDS: in logs, the least time between two of a run's epoch lines (default 30; 0: every
    epoch)."""
    raw = os.environ.get(LOG_SECONDS, "30")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise UserError(f"{LOG_SECONDS}={raw!r} is not a number of seconds: set it to 0 (a line every epoch) or more")
    return seconds


class ConsoleLog(loop.Callback):
    """Where a run stands, at a rate a reader can follow. On a terminal: a bar per run (epochs done, the latest
    validation numbers) that stays as the run's one line when it ends. In logs (CI, `dvc repro | tee`): an epoch's
    line once `every` seconds have passed since the run's last one, and the last epoch's if it printed any before;
    a short run prints none (its stage's summary says how it went)."""

    def __init__(self, name: str, epochs: int, every: float | None = None, terminal: bool | None = None,
                 clock=time.monotonic):
        self.name, self.epochs, self.clock = name, epochs, clock
        self.every = log_seconds() if every is None else every
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar, self.printed, self.last = None, 0, clock()  # printed: the last epoch shown

    def on_fit_start(self, model, history: list[EpochMetrics]) -> None:
        self.last = self.clock()
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=self.epochs, initial=len(history), desc=f"[{self.name}]", unit="epoch",
                            dynamic_ncols=True)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        if self.bar is not None:
            self.bar.set_postfix(val_loss=f"{m.val_loss:.4f}", val_acc=f"{m.val_accuracy:.4f}", refresh=False)
            self.bar.update(1)
        elif self.clock() - self.last >= self.every:
            self._line(m)

    def on_fit_end(self, result: loop.FitResult) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed and self.printed != result.history[-1].epoch:  # a long run's log ends with its end
            self._line(result.history[-1])

    def _line(self, m: EpochMetrics) -> None:
        print(f"[{self.name}] epoch {m.epoch:>3}/{self.epochs} train_loss {m.train_loss:.4f} "
              f"train_acc {m.train_accuracy:.4f} val_loss {m.val_loss:.4f} val_acc {m.val_accuracy:.4f} "
              f"lr {m.lr:.2e} {m.epoch_seconds:.2f}s", flush=True)
        self.printed, self.last = m.epoch, self.clock()
