"""`tune`: the Optuna search over tune.space for model.name -> reports/tune/."""

from __future__ import annotations

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import UserError


def tune(cfg: Config, worker_args: list[str], worker: bool = False) -> None:
    """Optuna search over tune.space for model.name -> reports/tune/ (best_params.json, trials, plots)."""
    from pipeline import devices, tuning

    if cfg.tune.lr_from_finder:
        cfg = lr_from_finder(cfg, say=not worker)
    devices.set_threads(cfg.train.threads, cfg.tune.workers if worker else 1)  # workers share the cores
    if worker:
        tuning.work(cfg, paths.PREPARED_DIR)
    else:
        tuning.tune(cfg, paths.PREPARED_DIR, worker_args)


def lr_from_finder(cfg: Config, say: bool = True) -> Config:
    """cfg searching train.lr a decade either side of the range test's suggestion for model.name (log scale):
    tune.lr_from_finder. The study is named by the space it searches, so a new suggestion is a new study."""
    from pipeline import files

    path = paths.lr_find_dir(cfg.model.name) / paths.LR_SUGGESTION
    record = files.read_json(path, "run `python -m pipeline lr-find` (or `dvc repro lr_find`) to write it, or set "
                                   "tune.lr_from_finder to false")
    steepest = record.get("steepest") if isinstance(record, dict) else None
    if not (isinstance(steepest, float) and steepest > 0 and record.get("model") == cfg.model.name):
        raise UserError(f"{path} is not a range test of {cfg.model.name}: run `python -m pipeline lr-find` (or "
                        "`dvc repro lr_find`) to write it")
    low, high = steepest / 10, steepest * 10
    if say:
        print(f"[tune] train.lr searched in {low:.2e} .. {high:.2e}, a decade either side of the range test's "
              f"suggestion ({path})", flush=True)
    space = {**cfg.model_dump()["tune"]["space"], "train.lr": {"low": low, "high": high, "log": True}}
    return cfg.with_overrides({"tune.space": space}, source=str(path))
