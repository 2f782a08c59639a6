"""Optuna search through the shared training loop.

The loop knows nothing of Optuna: `OptunaPruning` reports each epoch's
validation metric to the trial and raises `TrialPruned` when the pruner says so.
Several worker processes may run one study; a file lock around "count trials,
then start one" keeps the total at exactly `tune.n_trials`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from filelock import FileLock
from optuna.trial import TrialState

from pipeline import data, loop
from pipeline.config import Config, SearchDimension, TuneConfig
from pipeline.errors import UserError, first_line

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
TRIAL_FAILURES = (loop.NonFiniteLossError, torch.cuda.OutOfMemoryError)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us instead
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(cfg: TuneConfig) -> str:
    from pipeline.tracking import project_root

    return cfg.storage or f"sqlite:///{project_root() / 'optuna.db'}"


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """An RDB URL (SQLite with a busy timeout, PostgreSQL, MySQL), or a journal file for a path."""
    url = storage_url(cfg)
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Writers wait for each other instead of failing with "database is locked".
        engine = {"connect_args": {"timeout": 120}}
    else:
        engine = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))


def study_name(cfg: Config) -> str:
    """dataset-model-hash: same search (space, data, model, loop settings) -> same study, so it resumes."""
    runtime = {"n_trials", "timeout", "workers", "storage", "heartbeat_interval", "grace_period"}
    searched = cfg.model_dump(exclude={"tracking": True, "tune": runtime})
    digest = hashlib.sha256(json.dumps(searched, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.name}-{cfg.model.name}-{digest}"


def make_sampler(cfg: Config) -> optuna.samplers.BaseSampler:
    tune = cfg.tune
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if tune.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=tune.startup_trials)
    if tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=tune.startup_trials)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=tune.startup_trials)


def make_pruner(tune: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=epochs)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.warmup_epochs))
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    values = {}
    for key, dim in space.items():
        if dim.choices is not None:
            if all(isinstance(c, (str, int, float, bool, type(None))) for c in dim.choices):
                values[key] = trial.suggest_categorical(key, dim.choices)
            else:  # Optuna's categoricals are scalars; lists (e.g. layer widths) travel as JSON
                values[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in dim.choices]))
        elif dim.is_int:
            values[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def decoded_params(trial: optuna.trial.FrozenTrial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    return {key: json.loads(value) if isinstance(value, str) and space[key].choices is not None
            and not any(isinstance(c, str) for c in space[key].choices) else value
            for key, value in trial.params.items()}


class OptunaPruning(loop.Callback):
    """Reports the validation metric per epoch; stops the loop when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, metrics: loop.EpochMetrics) -> None:
        self.trial.report(getattr(metrics, self.metric), metrics.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch}")


@dataclass
class Search:
    """What every trial of one worker shares: config, data on the device, the study and its MLflow parent."""

    cfg: Config
    prepared: data.PreparedData
    device: torch.device
    study: optuna.Study
    slot: FileLock
    parent_run_id: str | None = None

    def trial_config(self, trial: optuna.Trial) -> Config:
        epochs = self.cfg.tune.epochs or self.cfg.train.epochs
        return self.cfg.with_overrides({**suggest(trial, self.cfg.tune.space), "train.epochs": epochs,
                                        "train.monitor": self.cfg.tune.metric, "train.resume": False})

    def objective(self, trial: optuna.Trial) -> float:
        self.slot.release()  # the trial exists now: other workers may count it and start theirs
        from pipeline.stages import tracked_run, training_setup

        cfg = self.trial_config(trial)
        model, *batches = training_setup(cfg, self.prepared, self.device)
        name = f"trial-{trial.number:03d}"
        state = "FAIL"
        try:
            with tracked_run(cfg, f"{self.study.study_name}-{name}", self.prepared.md5, role="trial",
                             parent_run_id=self.parent_run_id, finished_on=(optuna.TrialPruned,)) as run:
                # tracking first: a pruned trial's last epoch must still reach MLflow
                callbacks = ([run.metrics] if run else []) + [OptunaPruning(trial, cfg.tune.metric)]
                if run:
                    import mlflow

                    trial.set_user_attr("mlflow_run_id", run.run_id)
                    mlflow.set_tags({"optuna.study": self.study.study_name, "optuna.trial": trial.number})
                try:
                    result = loop.fit(model, *batches, cfg.train, self.device, callbacks)
                    state = "COMPLETE"
                except optuna.TrialPruned:
                    state = "PRUNED"
                    raise
                except TRIAL_FAILURES as err:
                    trial.set_user_attr("fail_reason", first_line(err))
                    raise
                finally:
                    if run:
                        mlflow.set_tag("optuna.state", state)
        finally:
            print(f"[tune] {name} {state:<8} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in trial.params.items()), flush=True)
            del model, batches
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next trial may build a bigger model
        return result.best_score


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def run_worker(search: Search) -> None:
    """Start trials until the study holds n_trials counted trials (or this worker's timeout passes)."""
    tune = search.cfg.tune
    deadline = time.monotonic() + tune.timeout if tune.timeout else None
    while deadline is None or time.monotonic() < deadline:
        search.slot.acquire()
        try:
            optuna.storages.fail_stale_trials(search.study)  # a SIGKILLed worker's trial is retried (no-op without heartbeats)
            if counted_trials(search.study) >= tune.n_trials:
                break
            search.study.optimize(search.objective, n_trials=1, catch=TRIAL_FAILURES, gc_after_trial=True)
        finally:
            if search.slot.is_locked:
                search.slot.release()


def open_search(cfg: Config, prepared_dir: Path) -> Search:
    name = study_name(cfg)
    study = optuna.create_study(storage=open_storage(cfg.tune), study_name=name, load_if_exists=True,
                                direction=cfg.tune.direction, sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg.tune, cfg.tune.epochs or cfg.train.epochs))
    slot_path = Path(tempfile.gettempdir()) / (
        "pipeline-tune-" + hashlib.sha256(f"{storage_url(cfg.tune)}|{name}".encode()).hexdigest()[:16] + ".lock")
    device = loop.resolve_device(cfg.train.device)
    prepared = data.load_prepared(prepared_dir).to(device)  # once per worker, not once per trial
    return Search(cfg, prepared, device, study, FileLock(slot_path))


def work(cfg: Config, prepared_dir: Path) -> None:
    """One of several worker processes started by `tune`: trials only, no reports."""
    search = open_search(cfg, prepared_dir)
    search.parent_run_id = search.study.user_attrs.get("mlflow_parent_run_id") if cfg.tracking.enabled else None
    run_worker(search)


def tune(cfg: Config, prepared_dir: Path, out_dir: Path, worker_args: list[str]) -> dict:
    """Run the search with `tune.workers` processes, then write reports; returns the best-params record."""
    search = open_search(cfg, prepared_dir)
    study = search.study
    print(f"[tune] study {study.study_name} on {_redacted(storage_url(cfg.tune))}: "
          f"{counted_trials(study)}/{cfg.tune.n_trials} trials so far, {cfg.tune.workers} worker(s)", flush=True)
    with parent_run(cfg, search) as parent:
        if cfg.tune.workers == 1:
            run_worker(search)
        else:
            _run_worker_processes(cfg.tune.workers, worker_args)
        best = _best_trial(study)
        record = {"study": study.study_name, "metric": cfg.tune.metric, "direction": cfg.tune.direction,
                  "value": best.value, "trial": best.number, "params": decoded_params(best, cfg.tune.space)}
        write_reports(study, record, out_dir)
        if parent:
            parent.log_metrics({f"best_{cfg.tune.metric}": best.value, "best_trial": best.number})
            parent.log_artifacts(*sorted(out_dir.iterdir()))
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    print(f"[tune] best trial {best.number}: {cfg.tune.metric} {best.value:.4f} with {record['params']} "
          f"({', '.join(f'{k.lower()} {v}' for k, v in counts.items() if v)})", flush=True)
    return record


@contextlib.contextmanager
def parent_run(cfg: Config, search: Search):
    """The study's one MLflow parent run: created with the study, resumed with it, shared by all workers."""
    from pipeline.stages import tracked_run

    existing = search.study.user_attrs.get("mlflow_parent_run_id")
    resume = existing if existing and cfg.tracking.enabled and _run_exists(cfg, existing) else None
    with tracked_run(cfg, search.study.study_name, search.prepared.md5, role="study", run_id=resume) as run:
        if run and not resume:
            import mlflow

            mlflow.set_tags({"optuna.study": search.study.study_name,
                             "optuna.storage": _redacted(storage_url(cfg.tune))})
            search.study.set_user_attr("mlflow_parent_run_id", run.run_id)
        search.parent_run_id = run.run_id if run else None
        yield run


def _run_exists(cfg: Config, run_id: str) -> bool:
    import mlflow

    from pipeline import tracking

    try:
        tracking.connect(cfg.tracking).get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def _run_worker_processes(workers: int, worker_args: list[str]) -> None:
    command = [sys.executable, "-m", "pipeline", "tune", "--worker", *worker_args]
    processes = [subprocess.Popen(command) for _ in range(workers)]
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    if any(codes):
        raise UserError(f"tune: worker exit codes {codes}; see their errors above")


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"tune: no trial of study {study.study_name} completed; see the trial lines above "
                        f"and the trials' fail_reason") from None


def write_reports(study: optuna.Study, record: dict, out_dir: Path) -> None:
    """best_params.json, trials.csv, and Optuna's own plots as PNGs."""
    from pipeline import reporting

    out_dir.mkdir(parents=True, exist_ok=True)
    reporting.write_json(out_dir / "best_params.json", record)
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration",
                                          "datetime_start"))
    reporting.write_text(out_dir / "trials.csv", frame.to_csv(index=False))
    plt = reporting.pyplot()
    from optuna.visualization import matplotlib as optuna_plots

    plots = {"optimization_history": optuna_plots.plot_optimization_history,
             "param_importances": optuna_plots.plot_param_importances,
             "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
             "intermediate_values": optuna_plots.plot_intermediate_values}
    for name, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            print(f"[tune] skipped {name} plot: {err}", file=sys.stderr)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(10, 5)
        reporting.save_figure(figure, out_dir / f"{name}.png")
    plt.close("all")


def _redacted(url: str) -> str:
    """Storage URL without a password, for logs and tags."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url
