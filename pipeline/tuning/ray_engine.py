"""Ray Tune as the search's engine (tune.engine: ray): Ray schedules the trials, on one machine or a cluster.

The study stays the pipeline's own Optuna study: Ray Tune's `OptunaSearch`
proposes each trial from it (this search's sampler, space and storage, the
untuned settings first), so optuna-dashboard, the confirmation over seeds, the
reports and `train_final` read the same study whichever engine ran it. Ray
places each trial on a worker with `tune.resources` (CPUs, and GPUs whose
fractions share a GPU) and stops the
unpromising ones with its ASHA scheduler (first rung at tune.warmup_epochs, as
the successive-halving pruner). Each trial trains through the shared loop, an
epoch per Ray step, and reports the value it is judged on so far (its best
window of tune.metric, `loop.smoothed`), so the value Ray hands back to the
study is the one the Optuna engine records. Every epoch is a checkpoint: a
trial whose node dies restarts on another from its last epoch
(tune.ray_max_failures times) and continues its own MLflow run.

On a cluster (`tune.ray_address` or RAY_ADDRESS; KubeRay, `ray up`, SLURM) the
nodes need this package installed; the prepared tensors travel through Ray's
object store (`tune.with_parameters`), so they need no shared file system;
the trials' checkpoints go to tune.ray_storage, which every node must reach.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from pipeline import board, devices, files, loop, paths, training
from pipeline.config import SearchDimension
from pipeline.errors import UserError, first_line
from pipeline.tuning.space import decode, suggest
from pipeline.tuning.storage import counts, trial_id
from pipeline.tuning.study import STUDY_TAG, TRIAL_TAG, Search, trial_config, trial_run_name


NUMBER = "optuna_trial"  # the key of a Ray trial's config that says which study trial it is
FINISHED = "finished"  # in a trial's results: its run ended by itself (its epochs, or early stopping)
RAY_TRIAL = "ray.trial_id"  # the tag of a trial's MLflow run that a restarted worker finds it by
RAY_NODE = "ray.node_id"  # where it trains (last): a restarted trial shows the node it ended on
RESTORED = "ray.restored_after_epoch"  # a trial Ray restarted from its checkpoint: the epoch it went on from
CHECKPOINT = "trial"  # a Ray checkpoint holds <CHECKPOINT>.pt, the loop's resume point


class Space:
    """The define-by-run space OptunaSearch asks each trial's params through (it records what `suggest` asks of
    the trial); a class, as Ray pickles its searcher with the experiment's state."""

    def __init__(self, space: dict[str, SearchDimension]):
        self.space = space

    def __call__(self, trial) -> dict[str, int]:
        suggest(trial, self.space)
        return {NUMBER: trial.number}  # a constant of the trial's config: which study trial Ray runs


class StudySearch(OptunaSearch):
    """Ray Tune's OptunaSearch on the pipeline's study, telling it that a trial Ray stopped before it finished
    was pruned (as the Optuna engine's pruner does), not completed with the value it had when stopped."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = result is not None and not result.get(FINISHED, True)
        super().on_trial_complete(trial_id, None if stopped else result, error)  # no value, no error: PRUNED


class Trial(ray_tune.Trainable):
    """One study trial on a Ray worker: the shared loop (`loop.epochs`), an epoch per `step`.

    A class, not a function trainable: Ray calls `cleanup` in the worker's own
    thread when the trial ends, completed or stopped, so its MLflow run and
    TensorBoard close before the worker goes (a function trainable's thread is
    cut off wherever it is). Its checkpoint is the loop's resume point
    (`Run.state`), taken after every epoch: a trial whose worker or node is
    lost restarts elsewhere from its last epoch, exactly as the train stage
    resumes, and continues its own MLflow run (found by its Ray trial id).
    """

    def setup(self, params: dict[str, Any], cfg, prepared, study_name: str, parent_run_id: str | None) -> None:
        params = dict(params)
        self.number = params.pop(NUMBER)
        self.searched = decode(params, cfg.tune.space)
        self.cfg, self.metric = trial_config(cfg, self.searched), cfg.tune.metric
        self.prepared, self.study_name, self.parent_run_id = prepared, study_name, parent_run_id
        self.restored: loop.Checkpoints | None = None  # set by load_checkpoint, before the first step
        self.run: loop.Run | None = None
        self.epochs = None  # the loop, started by the first step
        self.closing = contextlib.ExitStack()  # TensorBoard, then the MLflow run

    def step(self) -> dict[str, Any]:
        try:
            if self.epochs is None:
                self._start()
            next(self.epochs, None)  # None: a restored trial whose last epoch was already done
        except BaseException:
            self.closing.__exit__(*sys.exc_info())  # the MLflow run ends FAILED with this error; Ray shows it too
            raise
        m = self.run.history[-1]
        # the value the Optuna engine records: the trial's best window of tune.metric so far (loop.smoothed)
        return {self.metric: self.run.best_score, "epoch": m.epoch, f"epoch_{self.metric}": getattr(m, self.metric),
                FINISHED: self.run.ended, "done": self.run.ended}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        files.save_torch(self.run.state(), Path(checkpoint_dir) / f"{CHECKPOINT}.pt")

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.restored = loop.Checkpoints(Path(checkpoint_dir), CHECKPOINT, writer=False)
        self.restored.load()  # now: Ray may remove the directory once this returns

    def cleanup(self) -> None:
        self.closing.close()  # FINISHED: its epochs done, or stopped by ASHA (the study records it PRUNED)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial on this worker (TuneConfig.reuse_actors): this one closed as `cleanup` closes it, the
        next set up in the same process, which saves a process start (its imports) per trial."""
        self.cleanup()
        self.setup(new_config)  # with_parameters' `setup` fetches the same cfg and tensors again
        return True

    def _start(self) -> None:
        cfg = self.cfg
        device = devices.resolve_device(cfg.train.device)
        torch.set_num_threads(max(1, int(cfg.tune.resources.cpu)))
        model, train_batches, val_batches = training.setup(cfg, self.prepared.to(device), device)
        name = trial_run_name(self.study_name, self.number)
        continued = self._lost_run()
        tags = {STUDY_TAG: self.study_name, TRIAL_TAG: str(self.number), RAY_TRIAL: self.trial_id,
                RAY_NODE: ray.get_runtime_context().get_node_id(), "torch.threads": str(torch.get_num_threads())}
        if self.restored:
            tags[RESTORED] = str(self.restored.load()["epoch"])
        run = self.closing.enter_context(training.tracked_run(
            cfg, name, "trial", self.prepared.md5, parent_run_id=self.parent_run_id, continue_run_id=continued,
            tags=tags))
        if run and not continued:
            run.log_config()
        callbacks: list[loop.Callback] = [run.metrics] if run else []
        if cfg.tracking.tensorboard:
            tensorboard = board.TensorBoard(board.run_dir(cfg, name), cfg, hparams=self.searched)
            self.closing.callback(tensorboard.close)  # a trial Ray stopped keeps the epochs it trained
            callbacks.append(tensorboard)
        # a restored trial resumes from Ray's checkpoint as the train stage resumes from its own
        train = cfg.train.model_copy(update={"resume": True})
        self.run = loop.Run(model, train, train_batches, val_batches, callbacks, checkpoints=self.restored)
        self.epochs = loop.epochs(self.run, device)

    def _lost_run(self) -> str | None:
        """The MLflow run this trial had on a worker Ray lost (it restarts under the same trial id), if any."""
        if not (self.cfg.tracking.enabled and self.parent_run_id):
            return None
        from pipeline import tracking

        runs = tracking.child_runs(tracking.connect(self.cfg.tracking), self.parent_run_id, RAY_TRIAL,
                                   [self.trial_id])
        return list(runs)[-1] if runs else None


class TrialLines(ray_tune.Callback):
    """One line per finished trial, as the Optuna engine prints (Ray's own progress table is off), and one per
    trial Ray restarts after losing its worker; a trial's last epoch into the study, which OptunaSearch leaves
    out when Ray stops the trial there; and which Ray trials ran (their MLflow runs must not stay RUNNING)."""

    def __init__(self, search: Search):
        self.metric = search.cfg.tune.metric
        self.storage, self.study_id = search.storage, search.study_id
        self.trial_ids: list[str] = []
        self.restarts = 0

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self.trial_ids:
            self.trial_ids.append(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("done") and self.metric in result:  # stopped here: the searcher never hears of this epoch
            number = trial_id(self.storage, self.study_id, trial.config[NUMBER])
            self.storage.set_trial_intermediate_value(number, result["training_iteration"], result[self.metric])

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.restarts += 1
        epochs = (trial.last_result or {}).get("epoch", 0)
        self._line(trial, f"RESTART  its worker was lost after epoch {epochs}: it goes on from its last checkpoint "
                          "on another")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        epochs, value = result.get("epoch", 0), result.get(self.metric, float("nan"))
        how = f"{epochs} epoch{'s' * (epochs != 1)} in {result.get('time_total_s', 0):.1f}s on Ray"
        if not result.get(FINISHED, False):
            self._line(trial, f"PRUNED   {self.metric} {value:.4f} at epoch {epochs} (ASHA), {how}")
        else:
            self._line(trial, f"COMPLETE {self.metric} {value:.4f}, {how}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAIL    ")

    def _line(self, trial, what: str) -> None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items()
                           if k != NUMBER)
        print(f"[tune] trial {trial.config[NUMBER]:>3} {what}  {params}", flush=True)


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
    lines = TrialLines(search)
    try:
        searcher = StudySearch(space=Space(cfg.tune.space), metric=cfg.tune.metric, mode=mode,
                               sampler=study.sampler, study_name=study.study_name, storage=search.storage)
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(Trial, cfg=cfg, prepared=search.prepared.to(torch.device("cpu")),
                                     study_name=study.study_name, parent_run_id=search.parent_run_id),
            {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu})
        tuner = ray_tune.Tuner(
            trainable,
            tune_config=ray_tune.TuneConfig(
                search_alg=searcher, num_samples=missing, reuse_actors=True,
                scheduler=ASHAScheduler(time_attr="training_iteration", metric=cfg.tune.metric, mode=mode,
                                        max_t=cfg.tune.epochs, grace_period=max(1, cfg.tune.warmup_epochs))),
            run_config=ray_tune.RunConfig(
                name=study.study_name, storage_path=cfg.tune.ray_storage or str(paths.ray_results_dir()),
                verbose=0, callbacks=[lines], failure_config=ray_tune.FailureConfig(cfg.tune.ray_max_failures),
                checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1)))
        results = tuner.fit()
    finally:
        ray.shutdown()
        _close_lost_runs(cfg, search.parent_run_id, lines.trial_ids)
    failed = [result for result in results if result.error]
    restarts = f", {lines.restarts} restarted after their worker was lost" if lines.restarts else ""
    print(f"[tune] Ray Tune ran {len(results)} trials in {time.monotonic() - started:.0f}s{restarts}"
          + (f", {len(failed)} failed (first: {_last_line(failed[0].error)})" if failed else ""), flush=True)
    return counts(study)[0] >= cfg.tune.n_trials


def _close_lost_runs(cfg, parent_run_id: str | None, trial_ids: list[str]) -> None:
    """A trial whose worker died for good (its restarts used up, or the search interrupted) left its MLflow run
    RUNNING in a process of another node: the driver closes it (KILLED, saying why)."""
    if not (cfg.tracking.enabled and parent_run_id):
        return
    from pipeline import tracking

    client = tracking.connect(cfg.tracking)
    tracking.close_running_children(client, parent_run_id, RAY_TRIAL, dict.fromkeys(
        trial_ids, "its Ray worker was lost and Ray did not finish the trial"))


def _last_line(error: BaseException) -> str:
    """A Ray trial's error is its worker's whole traceback; the cause is on its last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
