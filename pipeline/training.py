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
from functools import cache
from pathlib import Path

import torch

from pipeline import data, devices, distributed, loop, models
from pipeline.config import Config
from pipeline.errors import UserError


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
    train_batches, val_batches = data.training_batches(
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


def resume_key(cfg: Config, data_md5: str) -> str:
    """Names a run's resume point: same config, same prepared data and same code, or it is another run's."""
    return f"{cfg.fingerprint()}-{data_md5[:8]}-{code_version()[:8]}"


def summary(cfg: Config, result: loop.FitResult, model: torch.nn.Module) -> dict:
    """The run's outcome as metrics.json holds it: deterministic (no timings), so re-runs change nothing."""
    best = result.best
    return {
        "model": cfg.model.name,
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_accuracy": best.train_accuracy, "val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
        # a train/val gap that keeps growing is the classic over-fitting signal
        "generalization_gap": best.train_accuracy - best.val_accuracy,
        "parameters": models.count_parameters(model),
    }


def tracked_run(cfg: Config, name: str, role: str, data_md5: str, **options):
    """An MLflow run (tracking.enabled; see tracking.TrackedRun for `options`) or a context yielding None."""
    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    from pipeline import tracking

    return tracking.TrackedRun(cfg, name, role, data_md5, **options)
