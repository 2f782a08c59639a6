"""One trial of a search around the shared loop: asked under the study lock, trained as a `loop.Run` (alone or
in a population), told how it ended; and the params a population's trials hold equal.

The loop knows nothing of Optuna: `OptunaPruning` reports each epoch's
validation metric to the trial and raises `TrialPruned` when the pruner says so.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from pipeline import loop, population, processes, training
from pipeline.errors import first_line
from pipeline.metrics import EpochMetrics
from pipeline.tuning.space import shared_params, suggest
from pipeline.tuning.storage import OWNER, beat, counts, fail_dead_trials, trial_id
from pipeline.tuning.study import STUDY_TAG, TRIAL_TAG, Search, trial_config, trial_run_name

TRIAL_FAILURES = (loop.NonFiniteLossError, torch.cuda.OutOfMemoryError)


class OptunaPruning(loop.Callback):
    """Reports the validation metric per epoch; stops the loop when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.last: tuple[int, float] = (0, float("nan"))  # (epoch, value) last reported

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        self.last = (metrics.epoch, getattr(metrics, self.metric))
        self.trial.report(self.last[1], metrics.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch}")


class NoTrial(enum.Enum):
    """Why no trial was started: the study has all its trials, or the rest are running elsewhere (wait: they
    may fail and be retried)."""

    FULL = "full"
    WAIT = "wait"


def next_trial(search: Search) -> tuple[optuna.Trial, int] | NoTrial:
    """Under the study lock: a new (or waiting) trial to run and its id in the storage, or why there is none."""
    tune = search.cfg.tune
    with search.lock:
        fail_dead_trials(search.study, search.storage, search.study_id, tune.grace_period)
        finished, running, _ = counts(search.study)
        if finished >= tune.n_trials:
            return NoTrial.FULL
        if finished + len(running) >= tune.n_trials:
            return NoTrial.WAIT
        trial = search.study.ask()  # takes a waiting (enqueued or retried) trial first
        trial.set_user_attr(OWNER, processes.identity())
        number = trial_id(search.storage, search.study_id, trial.number)
        # a first beat at once: a trial without any heartbeat is never judged stale, so one killed before its
        # first interval would keep the study waiting forever
        beat(search.storage, number)
        search.running.add(number)
        return trial, number


class TrialRun:
    """One trial around the shared loop: its params and config, its MLflow run and pruning callback, and how the
    study is told it ended (also on Ctrl-C)."""

    def __init__(self, search: Search, trial: optuna.Trial, number: int):
        self.search, self.trial, self.trial_id = search, trial, number
        self.params = suggest(trial, search.cfg.tune.space)
        self.cfg = trial_config(search.cfg, self.params)
        self.run = self.pruning = self.trained = self.board = None
        self.alone = False  # trains one at a time, whatever tune.population says (see `start`)
        self._closing = contextlib.ExitStack()
        trial.set_user_attr("threads", torch.get_num_threads())  # shapes its numbers (summation order); see config

    def start(self) -> loop.Run:
        """The trial as a run of the loop: its model, batches and callbacks."""
        search, cfg, trial = self.search, self.cfg, self.trial
        model, train_batches, val_batches = training.setup(cfg, search.prepared, search.device)
        self.run = self._closing.enter_context(training.tracked_run(
            cfg, trial_run_name(search.study.study_name, trial.number), "trial", search.prepared.md5,
            parent_run_id=search.parent_run_id, finished_on=(optuna.TrialPruned,),
            tags={STUDY_TAG: search.study.study_name, TRIAL_TAG: str(trial.number),
                  "torch.threads": str(torch.get_num_threads())}))
        if self.run:
            trial.set_user_attr("mlflow_run_id", self.run.run_id)
            self.run.log_config()  # the trial's whole config: what `reproduce` or a person needs
        # tracking first: a pruned trial's last epoch must still reach MLflow
        self.pruning = OptunaPruning(trial, cfg.tune.metric)
        if cfg.tracking.tensorboard:
            from pipeline import board

            self.board = board.TensorBoard(board.run_dir(cfg, trial_run_name(search.study.study_name, trial.number)),
                                           cfg, hparams=self.params)
        callbacks = ([self.run.metrics] if self.run else []) + ([self.board] if self.board else []) + [self.pruning]
        self.trained = loop.Run(model, cfg.train, train_batches, val_batches, callbacks, key=self)
        self.alone = population.alone(self.trained, search.device, search.prepared.input_shape[1:])
        return self.trained

    def finish(self, result: loop.FitResult | None, error: BaseException | None) -> None:
        """Close the MLflow run, tell the study how the trial ended, print its line."""
        search, trial, metric = self.search, self.trial, self.cfg.tune.metric
        state, value, note = TrialState.FAIL, None, "interrupted"
        if result is not None:
            state, value = TrialState.COMPLETE, result.best_score
        elif isinstance(error, optuna.TrialPruned):
            epoch, last = self.pruning.last
            state, note = TrialState.PRUNED, f"{metric} {last:.4f} at epoch {epoch}"
        elif isinstance(error, TRIAL_FAILURES):
            note = first_line(error)
            trial.set_user_attr("fail_reason", note)
        if self.run:
            self.run.closing_tags["optuna.state"] = state.name
        if self.board:
            self.board.close()  # a pruned or failed trial keeps the epochs it trained
        try:
            self._closing.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)
        finally:  # the study hears how the trial ended even if its MLflow run could not be closed
            search.running.discard(self.trial_id)
            told = search.study.tell(trial, value, state=state, skip_if_finished=True)
            if told.state != state:  # a worker judged it dead (heartbeats late on a starved machine), retried it
                state, note = told.state, "judged dead by another worker (late heartbeats); its result is dropped"
                value = None
            shown = f"{metric} {value:.4f}" if value is not None else note
            print(f"[tune] trial {trial.number:>3} {state.name:<8} {shown}, {self._trained()}  " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()), flush=True)

    def _trained(self) -> str:
        """How long the trial trained (its epochs' time, not its wait for a place in a population), and whether
        it trained in company."""
        history = self.trained.history if self.trained else []
        seconds = sum(m.epoch_seconds for m in history)
        company = f" in a population of up to {self.search.population}" \
            if self.search.population > 1 and not self.alone else ""
        return f"{len(history)} epoch{'s' * (len(history) != 1)} in {seconds:.1f}s{company}"


class SharedParams:
    """What a population's trials share (`shared_params`: the model and its widths, the batch size...): held for
    tune.population trials in a row, then drawn again by the sampler. A population stays one forward pass, and
    the search still explores those params, once per population instead of once per trial. The startup trials
    (tune.startup_trials, sampled at random) draw their own: the sampler needs to have seen several values of
    them, or it would propose the first one for ever."""

    def __init__(self):
        self.params: dict[str, Any] = {}
        self.trials = 0  # asked with these params

    def next_run(self, search: Search, hold: bool = True) -> TrialRun | NoTrial:
        """The next trial, with these params unless `search.population` trials had them or `hold` is False (the
        sampler's own choice then becomes the ones held), or why there is none (see `next_trial`)."""
        held = hold and bool(self.params) and self.trials < search.population
        sampler = search.study.sampler
        if held:  # Optuna's way to fix some params: they keep their distributions, so the sampler learns from them
            search.study.sampler = optuna.samplers.PartialFixedSampler(self.params, sampler)
        try:
            asked = next_trial(search)
            if isinstance(asked, NoTrial):
                return asked
            run = TrialRun(search, *asked)  # samples its params
            trial = run.trial
        finally:
            search.study.sampler = sampler
        if held:  # said on the trial (optuna-dashboard shows it): these values were not the sampler's choice
            # ...unless the trial came with its own (params.yaml's trial, a retry), which no sampler overrides
            fixed = search.storage.get_trial_system_attrs(run.trial_id).get("fixed_params", {})
            if keys := sorted(set(self.params) - set(fixed)):
                trial.set_user_attr("held_for_population", keys)
        else:
            self.params, self.trials = shared_params(trial.params), 0
        self.trials += 1
        return run

    def forget(self) -> None:
        """The next trial draws its own: this one trains alone (`TrialRun.alone`), with no forward pass to share,
        so holding its params would only narrow the search."""
        self.params = {}
