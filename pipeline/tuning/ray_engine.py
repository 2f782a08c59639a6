"""Ray Tune as the search's engine (tune.engine: ray): Ray schedules the trials, on one machine or a cluster.

The study stays the pipeline's own Optuna study: Ray Tune's `OptunaSearch`
proposes each trial from it (this search's sampler, space and storage, the
untuned settings first), so optuna-dashboard, the confirmation over seeds, the
reports and `train_final` read the same study whichever engine ran it. Ray
places each trial on a worker with `tune.ray_cpus_per_trial` CPUs and
`tune.ray_gpus_per_trial` GPUs (fractions share a GPU) and stops the
unpromising ones with its ASHA scheduler (first rung at tune.warmup_epochs, as
the successive-halving pruner). Each trial trains through the shared loop; a
callback reports, per epoch, the value the trial is judged on so far (its best
window of tune.metric, `loop.smoothed`), so the value Ray hands back to the
study is the one the Optuna engine records.

On a cluster (`tune.ray_address` or RAY_ADDRESS; KubeRay, `ray up`, SLURM) the
nodes need this package installed; the prepared tensors travel through Ray's
object store (`tune.with_parameters`), so they need no shared file system.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
import torch
from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from pipeline import board, devices, loop, paths, training
from pipeline.config import SearchDimension
from pipeline.errors import UserError, first_line
from pipeline.metrics import EpochMetrics, is_better, worst
from pipeline.tuning.space import decode, suggest
from pipeline.tuning.storage import counts, trial_id
from pipeline.tuning.study import Search, trial_config, trial_run_name


NUMBER = "optuna_trial"


class Space:
    """The define-by-run space OptunaSearch asks each trial's params through (it records what `suggest` asks of
    the trial); a class, as Ray pickles its searcher with the experiment's state."""

    def __init__(self, space: dict[str, SearchDimension]):
        self.space = space

    def __call__(self, trial) -> dict[str, int]:
        suggest(trial, self.space)
        return {NUMBER: trial.number}  # a constant of the trial's config: which study trial Ray runs


class StudySearch(OptunaSearch):
    """Ray Tune's OptunaSearch on the pipeline's study, telling it that a trial Ray stopped before its last epoch
    was pruned (as the Optuna engine's pruner does), not completed with the value it had when stopped."""

    def __init__(self, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = result is not None and result.get("epoch", self.epochs) < self.epochs
        super().on_trial_complete(trial_id, None if stopped else result, error)  # no value, no error: PRUNED


class ReportToRay(loop.Callback):
    """Per epoch: the trial's score so far (its best window of tune.metric) to Ray Tune, which may stop it."""

    def __init__(self, metric: str, window: int):
        self.metric, self.window, self.history, self.best = metric, window, [], worst(metric)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        self.history.append(m)
        value = loop.smoothed(self.history, self.metric, self.window)
        if is_better(self.metric, value, self.best):
            self.best = value
        ray_tune.report({self.metric: self.best, "epoch": m.epoch, f"epoch_{self.metric}": getattr(m, self.metric)})


class TrialLines(ray_tune.Callback):
    """One line per finished trial, as the Optuna engine prints (Ray's own progress table is off); and a trial's
    last epoch into the study, which OptunaSearch leaves out when Ray stops the trial there."""

    def __init__(self, search: Search):
        self.metric, self.epochs = search.cfg.tune.metric, search.cfg.tune.epochs
        self.storage, self.study_id = search.storage, search.study_id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("done") and self.metric in result:  # stopped here: the searcher never hears of this epoch
            number = trial_id(self.storage, self.study_id, trial.config[NUMBER])
            self.storage.set_trial_intermediate_value(number, result["training_iteration"], result[self.metric])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        epochs, value = result.get("epoch", 0), result.get(self.metric, float("nan"))
        how = f"{epochs} epoch{'s' * (epochs != 1)} in {result.get('time_total_s', 0):.1f}s on Ray"
        if epochs < self.epochs:
            self._line(trial, f"PRUNED   {self.metric} {value:.4f} at epoch {epochs} (ASHA), {how}")
        else:
            self._line(trial, f"COMPLETE {self.metric} {value:.4f}, {how}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAIL    ")

    def _line(self, trial, what: str) -> None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items()
                           if k != NUMBER)
        print(f"[tune] trial {trial.config[NUMBER]:>3} {what}  {params}", flush=True)


def train_trial(params: dict[str, Any], cfg, prepared, study_name: str, parent_run_id: str | None) -> None:
    """One Ray trial: the study's params as a config, trained through the loop on this worker."""
    params = dict(params)
    number = params.pop(NUMBER)
    searched = decode(params, cfg.tune.space)
    trial_cfg = trial_config(cfg, searched)
    device = devices.resolve_device(trial_cfg.train.device)
    torch.set_num_threads(max(1, int(cfg.tune.ray_cpus_per_trial)))
    model, train_batches, val_batches = training.setup(trial_cfg, prepared.to(device), device)
    name = trial_run_name(study_name, number)
    with training.tracked_run(trial_cfg, name, "trial", prepared.md5,
                              parent_run_id=parent_run_id, finished_on=(SystemExit,),  # how Ray stops a trial
                              tags={"optuna.study": study_name, "optuna.trial": str(number),
                                    "ray.trial_id": ray_tune.get_context().get_trial_id(),
                                    "torch.threads": str(torch.get_num_threads())}) as run:
        if run:
            run.log_config()
        tensorboard = board.TensorBoard(board.run_dir(trial_cfg, name), trial_cfg, hparams=searched) \
            if trial_cfg.tracking.tensorboard else None
        callbacks = ([run.metrics] if run else []) + ([tensorboard] if tensorboard else []) + [
            ReportToRay(cfg.tune.metric, trial_cfg.train.monitor_window)]
        try:
            loop.fit_run(loop.Run(model, trial_cfg.train, train_batches, val_batches, callbacks), device)
        finally:
            if tensorboard:
                tensorboard.close()  # a trial Ray stopped keeps the epochs it trained


def run(search: Search) -> bool:
    """Run the trials the study lacks with Ray Tune; True when the study holds tune.n_trials finished ones."""
    cfg, study = search.cfg, search.study
    if search.prepared.train.streamed:
        raise UserError("tune.engine=ray sends the prepared tensors to its workers: raise data.memory_limit_mb so "
                        "the data is resident, or use tune.engine=optuna")
    missing = cfg.tune.n_trials - counts(study)[0]
    if missing <= 0:
        return True
    mode = "min" if cfg.tune.direction == "minimize" else "max"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = time.monotonic()
    address = cfg.tune.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, TimeoutError) as err:
        raise UserError(f"Ray cluster {address}: it does not answer ({first_line(err)}); start it, or unset "
                        "tune.ray_address / RAY_ADDRESS to run a Ray on this machine") from None
    try:
        searcher = StudySearch(cfg.tune.epochs, space=Space(cfg.tune.space), metric=cfg.tune.metric,
                                mode=mode, sampler=study.sampler, study_name=study.study_name,
                                storage=search.storage)
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(train_trial, cfg=cfg, prepared=search.prepared.to(torch.device("cpu")),
                                     study_name=study.study_name, parent_run_id=search.parent_run_id),
            {"cpu": cfg.tune.ray_cpus_per_trial, "gpu": cfg.tune.ray_gpus_per_trial})
        tuner = ray_tune.Tuner(
            trainable,
            tune_config=ray_tune.TuneConfig(
                search_alg=searcher, num_samples=missing,
                scheduler=ASHAScheduler(time_attr="training_iteration", metric=cfg.tune.metric, mode=mode,
                                        max_t=cfg.tune.epochs, grace_period=max(1, cfg.tune.warmup_epochs))),
            run_config=ray_tune.RunConfig(name=study.study_name, storage_path=str(paths.ray_results_dir()),
                                          verbose=0, callbacks=[TrialLines(search)]))
        results = tuner.fit()
    finally:
        ray.shutdown()
    failed = [result for result in results if result.error]
    print(f"[tune] Ray Tune ran {len(results)} trials in {time.monotonic() - started:.0f}s"
          + (f", {len(failed)} failed (first: {_last_line(failed[0].error)})" if failed else ""), flush=True)
    return counts(study)[0] >= cfg.tune.n_trials


def _last_line(error: BaseException) -> str:
    """A Ray trial's error is its worker's whole traceback; the cause is on its last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
