"""Optuna search through the shared training loop: every Optuna call of the pipeline lives here.

The loop knows nothing of Optuna: `OptunaPruning` reports each epoch's
validation metric to the trial and raises `TrialPruned` when the pruner says
so. Trials are driven by ask/tell, so any number of processes (and machines)
can work on one study:

- `StudyLock` (a file lock beside a local storage, an advisory lock inside
  PostgreSQL, also behind a gRPC storage proxy: `tune.lock`) serialises what
  must happen once: creating the schema and the
  study, its MLflow parent run, and "count the trials, then start one", which
  keeps the study at exactly `tune.n_trials`;
- every process draws its own sampler seed from the study (`seed` for the
  first, then a new stream per process), so workers and resumed searches
  propose new params while a single-worker search stays reproducible;
- a trial whose process died is failed and retried: at once when it ran on
  this host (its process is gone), after `grace_period` otherwise (heartbeats:
  Optuna's for RDB storages, this module's `HEARTBEAT` through a gRPC proxy);
- a run of `tune` finishes whatever the study lacks, waits for trials other
  processes are still running, and fails only if the study cannot complete.

Untracked searches never import MLflow.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
import torch
from optuna.trial import TrialState

from pipeline import data, devices, files, loop, paths, population, processes, training
from pipeline.config import Config, SearchDimension, TuneConfig, study_keys
from pipeline.errors import UserError, first_line, redact
from pipeline.metrics import EpochMetrics

TRIAL_FAILURES = (loop.NonFiniteLossError, torch.cuda.OutOfMemoryError)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER = "worker"  # trial user attr: the process running it (see processes.py)
POLL_S = 2.0  # how often a worker with nothing to start looks again
GRPC = "grpc://"  # tune.storage through Optuna's gRPC storage proxy
HEARTBEAT = "pipeline:heartbeat"  # trial system attr: its last sign of life, where the storage has no heartbeats

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us instead
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# `heartbeats()` below does for ask/tell what Optuna's warning says only study.optimize does.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# ---------------------------------------------------------------- storage and locks

def storage_url(cfg: TuneConfig) -> str:
    return cfg.storage or paths.default_optuna_storage()


def lock_url(cfg: TuneConfig) -> str:
    """Where the study lock lives: with the storage, or (a gRPC proxy has no lock of its own) in tune.lock, the
    PostgreSQL database behind the proxy."""
    url = storage_url(cfg)
    if not url.startswith(GRPC):
        return url
    if not (cfg.lock or "").startswith(("postgresql://", "postgres://", "postgresql+")):
        raise UserError(f"tune.storage {url}: a gRPC storage proxy has no lock of its own; set tune.lock to the "
                        "postgresql:// URL of the database behind it (its lock keeps the study at exactly n_trials)")
    return cfg.lock


def _local_file(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a database server."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None if "://" in url else Path(url)


class StudyLock:
    """One process at a time, across every process and machine that can reach the storage.

    A local storage (SQLite, journal) gets a file lock beside its file; PostgreSQL
    a session advisory lock, which machines sharing the database share too.
    """

    def __init__(self, url: str, name: str = "schema"):
        self.url, self.name = url, name
        local = _local_file(url)
        if local is not None:
            from filelock import FileLock

            self._file = FileLock(f"{local}.study-lock")  # not `.lock`: Optuna's journal takes that name itself
            self._engine = None
        elif url.startswith(("postgresql", "postgres")):
            import sqlalchemy

            self._file = None
            self._engine = sqlalchemy.create_engine(_sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
            self._key = int.from_bytes(hashlib.sha256(f"pipeline-study:{name}".encode()).digest()[:8], "big",
                                       signed=True)
            self._connection = None
        else:
            raise UserError(f"tune.storage {redact(url)!r}: use a SQLite URL, a postgresql:// URL or a journal "
                            "file path (other databases have no lock this pipeline can share across machines)")

    def __enter__(self) -> StudyLock:
        if self._file is not None:
            self._file.acquire()
        else:
            import sqlalchemy

            self._connection = self._engine.connect()
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.release()
        elif self._connection is not None:
            import sqlalchemy

            try:
                self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            finally:
                self._connection.close()
                self._connection = None


def _sqlalchemy_url(url: str) -> str:
    """postgresql:// as users copy it from docs means psycopg 3 here (SQLAlchemy 2.1 default); say so explicitly."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """An RDB URL (SQLite with a busy timeout, PostgreSQL) or a journal file path; the schema is created once,
    under the storage's lock, however many processes start at the same moment."""
    url = storage_url(cfg)
    if url.startswith(GRPC):
        return _grpc_proxy(url)
    local = _local_file(url)
    if local is not None and not local.parent.is_dir():
        raise UserError(f"tune.storage: folder {local.parent} does not exist; create it or fix the path")
    try:
        with StudyLock(url):
            if "://" not in url:
                from optuna.storages.journal import JournalFileBackend

                return optuna.storages.JournalStorage(JournalFileBackend(str(local)))
            # SQLite writers wait for each other instead of failing with "database is locked". A server's
            # connections are shared by every worker of every machine: a worker needs one, its heartbeat another.
            engine = {"connect_args": {"timeout": 120}} if local else \
                {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
            return optuna.storages.RDBStorage(
                _sqlalchemy_url(url), engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    except ImportError as err:
        raise UserError(f"tune.storage {redact(url)}: database driver missing ({first_line(err)}); install it with "
                        "`pip install -e '.[postgres]'`") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors: unreachable server, bad credentials
        raise UserError(f"cannot open tune.storage {redact(url)}: {redact(first_line(err))}") from None


def _grpc_proxy(url: str) -> optuna.storages.BaseStorage:
    """Optuna's gRPC storage proxy at grpc://host:port: many workers, one database connection pool (the
    proxy's). It has no heartbeats: this pipeline's own (`HEARTBEAT`) stand in for them."""
    address = urlsplit(url)
    if not address.hostname or not address.port:
        raise UserError(f"tune.storage {url}: write a gRPC storage proxy as grpc://host:port")
    try:
        socket.create_connection((address.hostname, address.port), timeout=10).close()  # refused: say so at once
        proxy = optuna.storages.GrpcStorageProxy(host=address.hostname, port=address.port)
        proxy.wait_server_ready(timeout=30)
    except ImportError as err:
        raise UserError(f"tune.storage {url}: gRPC missing ({first_line(err)}); install it with "
                        "`pip install -e '.[grpc]'`") from None
    except Exception as err:  # noqa: BLE001 - not listening, not a proxy
        raise UserError(f"cannot reach the gRPC storage proxy at {url}: {first_line(err)}; start it with "
                        "optuna.storages.run_grpc_proxy_server (see README)") from None
    return proxy


def _beat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """A sign of life of a running trial: an RDB heartbeat, or the `HEARTBEAT` time through a gRPC proxy."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.record_heartbeat(trial_id)
    elif isinstance(storage, optuna.storages.GrpcStorageProxy):
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


# ---------------------------------------------------------------- the study

def study_name(cfg: Config, data_md5: str) -> str:
    """dataset-model-hash of the search's definition and its data: same search -> same study, so it resumes;
    other data -> another study (trials on other data must never pick the final model)."""
    searched = {key: cfg.value(key) for key in study_keys()}
    digest = hashlib.sha256(json.dumps([searched, data_md5], sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.name}-{cfg.model.name}-{digest}"


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    tune = cfg.tune
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=tune.startup_trials)
    if tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=tune.startup_trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=tune.epochs)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.warmup_epochs))
    return optuna.pruners.NopPruner()


def sampler_seed(seed: int, stream: int) -> int:
    """`seed` itself for the first process of a study; a distinct, derived seed for every later one."""
    if stream == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:4], "big")


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    values = {}
    for key, dim in space.items():
        if dim.choices is not None:
            if _scalar_choices(dim):
                values[key] = trial.suggest_categorical(key, dim.choices)
            else:  # Optuna's categoricals are scalars; lists (e.g. layer widths) travel as JSON
                values[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in dim.choices]))
        elif dim.is_int:
            values[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def shared_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params (as Optuna holds them) that trials training together must share: every searched param but those
    a fused run may have of its own (`population.own_per_run`). The others (the model and its widths, the batch
    size, the precision) fix tensor shapes or kernels: trials differing in them would take turns, not share a
    forward pass."""
    return {key: value for key, value in params.items() if not population.own_per_run(key)}


def _scalar_choices(dim: SearchDimension) -> bool:
    return all(isinstance(c, (str, int, float, bool, type(None))) for c in dim.choices)


def decoded_params(trial: optuna.trial.FrozenTrial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    return {key: value if _scalar_choices_or_range(space[key]) else json.loads(value)
            for key, value in trial.params.items()}


def _scalar_choices_or_range(dim: SearchDimension) -> bool:
    return dim.choices is None or _scalar_choices(dim)


def default_params(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """(the searched params' values in params.yaml as Optuna spells them, the keys whose value lies outside
    the space); the defaults make a trial only when nothing lies outside."""
    values, outside = {}, []
    for key, dim in cfg.tune.space.items():
        value = cfg.value(key)
        if dim.choices is not None:
            values[key] = value if _scalar_choices(dim) else json.dumps(value)
            inside = value in dim.choices
        else:
            values[key] = value
            inside = dim.low <= value <= dim.high
        if not inside:
            outside.append(key)
    return values, outside


@dataclass
class Search:
    """What every trial of one process shares: config, data on the device, the study and its MLflow parent."""

    cfg: Config
    prepared: data.PreparedData
    device: torch.device
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    lock: StudyLock
    parent_run_id: str | None = None
    running: set[int] = field(default_factory=set)  # trial ids this process runs (heartbeats)
    population: int = 0  # trials trained at once: tune.population, halved each time the device runs out of memory

    def __post_init__(self):
        self.population = self.population or self.cfg.tune.population


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """What a trial with `params` trains: tune.epochs, judged on tune.metric, never resumed."""
    return cfg.with_overrides({**params, "train.epochs": cfg.tune.epochs, "train.monitor": cfg.tune.metric,
                               "train.resume": False})


def open_search(cfg: Config, prepared_dir: Path) -> Search:
    """Load (or create, once) the study; this process gets its own sampler stream."""
    device = devices.resolve_device(cfg.train.device)
    prepared = data.load_prepared(prepared_dir)
    where = lock_url(cfg.tune)  # a gRPC proxy without tune.lock is refused before anything is opened
    storage = open_storage(cfg.tune)
    name = study_name(cfg, prepared.md5)
    lock = StudyLock(where, name)
    with lock:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    direction=cfg.tune.direction)
        if not study.metric_names:
            study.set_metric_names([cfg.tune.metric])  # the dashboard's axis reads "val_loss", not "Objective 0"
        if not study.trials:
            # the untuned settings are trial 0: a search never hands over something worse on validation
            defaults, outside = default_params(cfg)
            if outside:
                print(f"[tune] params.yaml's {', '.join(outside)} lie outside tune.space: the untuned settings are "
                      "not a trial of this search", file=sys.stderr)
            else:
                study.enqueue_trial(defaults, user_attrs={"origin": "params.yaml"})
        stream = study.user_attrs.get("sampler_streams", 0)
        study.set_user_attr("sampler_streams", stream + 1)
    study.sampler = make_sampler(cfg, sampler_seed(cfg.seed, stream))
    study.pruner = make_pruner(cfg.tune)
    return Search(cfg, prepared.to(device), device, study, storage, lock)  # data moved once per process, not per trial


# ---------------------------------------------------------------- trials

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


def _counts(study: optuna.Study) -> tuple[int, list[optuna.trial.FrozenTrial], int]:
    """(finished trials, running trials, waiting trials)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    return finished, [t for t in trials if t.state == TrialState.RUNNING], \
        sum(t.state == TrialState.WAITING for t in trials)


def _fail_dead_trials(search: Search) -> None:
    """Fail (and retry) running trials whose process is gone: on this host by its pid, elsewhere by heartbeat."""
    study, storage = search.study, search.storage
    optuna.storages.fail_stale_trials(study)  # RDB heartbeats; a no-op for the journal
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    grace = search.cfg.tune.grace_period
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, beat = trial.user_attrs.get(OWNER, ""), trial.system_attrs.get(HEARTBEAT)
        silent = beat is not None and time.time() - beat > grace  # gRPC proxy: machine clocks agree within seconds
        # `_next_trial` names a trial's owner before it lets go of the lock this runs under: a running trial
        # without one was asked by a process stopped in between (Ctrl-C, SIGTERM, SIGKILL)
        orphan = OWNER not in trial.user_attrs
        if processes.is_dead(owner) or silent or orphan:
            reason = (f"no heartbeat for {grace}s" if silent else "its process stopped before it started"
                      if orphan else f"its process {owner} died")
            if _fail(storage, trial._trial_id, reason):
                retry(study, storage.get_trial(trial._trial_id))
                print(f"[tune] trial {trial.number} FAIL     {reason}; queued for a retry", flush=True)


def _fail(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a running trial, saying why; False if it had finished meanwhile."""
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    return storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _next_trial(search: Search) -> optuna.Trial | None | bool:
    """Under the study lock: a new (or waiting) trial to run, None if the study is full, False to wait."""
    tune = search.cfg.tune
    with search.lock:
        _fail_dead_trials(search)
        finished, running, waiting = _counts(search.study)
        if finished >= tune.n_trials:
            return None
        if finished + len(running) >= tune.n_trials:
            return False  # the rest are running elsewhere: wait, they may still fail and be retried
        trial = search.study.ask()  # takes a waiting (enqueued or retried) trial first
        trial.set_user_attr(OWNER, processes.identity())
        # a first beat at once: a trial without any heartbeat is never judged stale, so one killed before its
        # first interval would keep the study waiting forever
        _beat(search.storage, trial._trial_id)
        search.running.add(trial._trial_id)
        return trial


class TrialRun:
    """One trial around the shared loop: its params and config, its MLflow run and pruning callback, and how the
    study is told it ended (also on Ctrl-C)."""

    def __init__(self, search: Search, trial: optuna.Trial):
        self.search, self.trial = search, trial
        self.params = suggest(trial, search.cfg.tune.space)
        self.cfg = trial_config(search.cfg, self.params)
        self.run = self.pruning = None
        self.alone = False  # trains one at a time, whatever tune.population says (see `start`)
        self.tick = time.perf_counter()
        self._closing = contextlib.ExitStack()
        trial.set_user_attr("threads", torch.get_num_threads())  # shapes its numbers (summation order); see config

    def start(self) -> loop.Run:
        """The trial as a run of the loop: its model, batches and callbacks."""
        search, cfg, trial = self.search, self.cfg, self.trial
        self.tick = time.perf_counter()
        model, train_batches, val_batches = training.setup(cfg, search.prepared, search.device)
        self.run = self._closing.enter_context(training.tracked_run(
            cfg, f"{search.study.study_name}-trial-{trial.number:03d}", "trial", search.prepared.md5,
            parent_run_id=search.parent_run_id, finished_on=(optuna.TrialPruned,),
            tags={"optuna.study": search.study.study_name, "optuna.trial": str(trial.number),
                  "torch.threads": str(torch.get_num_threads())}))
        if self.run:
            trial.set_user_attr("mlflow_run_id", self.run.run_id)
            self.run.log_config()  # the trial's whole config: what `reproduce` or a person needs
        # tracking first: a pruned trial's last epoch must still reach MLflow
        self.pruning = OptunaPruning(trial, cfg.tune.metric)
        callbacks = ([self.run.metrics] if self.run else []) + [self.pruning]
        trained = loop.Run(model, cfg.train, train_batches, val_batches, callbacks, key=self)
        self.alone = population.alone(trained, search.device, search.prepared.input_shape[1:])
        return trained

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
        try:
            self._closing.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)
        finally:  # the study hears how the trial ended even if its MLflow run could not be closed
            search.running.discard(trial._trial_id)
            told = search.study.tell(trial, value, state=state, skip_if_finished=True)
            if told.state != state:  # a worker judged it dead (heartbeats late on a starved machine), retried it
                state, note = told.state, "judged dead by another worker (late heartbeats); its result is dropped"
                value = None
            shown = f"{metric} {value:.4f}" if value is not None else note
            print(f"[tune] trial {trial.number:>3} {state.name:<8} {shown} in {time.perf_counter() - self.tick:.1f}s"
                  "  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in self.params.items()), flush=True)


class Shape:
    """What a population's trials share (`shared_params`: the model and its widths, the batch size...): held for
    tune.population trials in a row, then drawn again by the sampler. A population stays one forward pass, and
    the search still explores those params, once per population instead of once per trial. The startup trials
    (tune.startup_trials, sampled at random) draw their own: the sampler needs to have seen several values of
    them, or it would propose the first one for ever."""

    def __init__(self):
        self.params: dict[str, Any] = {}
        self.trials = 0  # asked with these params

    def next_run(self, search: Search, hold: bool = True) -> TrialRun | None | bool:
        """The next trial, with this shape's params unless `search.population` trials had them or `hold` is False
        (the sampler's own choice then becomes the shape); None if the study is full, False to wait (see
        `_next_trial`)."""
        held = hold and bool(self.params) and self.trials < search.population
        sampler = search.study.sampler
        if held:  # Optuna's way to fix some params: they keep their distributions, so the sampler learns from them
            search.study.sampler = optuna.samplers.PartialFixedSampler(self.params, sampler)
        try:
            trial = _next_trial(search)
            if trial is None or trial is False:
                return trial
            run = TrialRun(search, trial)  # samples its params
        finally:
            search.study.sampler = sampler
        if held:  # said on the trial (optuna-dashboard shows it): these values were not the sampler's choice
            # ...unless the trial came with its own (params.yaml's trial, a retry), which no sampler overrides
            fixed = search.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
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


def run_population(search: Search, deadline: float | None) -> bool:
    """Train up to tune.population trials at once through the loop; True when the study needs no more of them.

    A slot freed by a finished or pruned trial goes at once to the next trial the
    study asks for, while the others train on. The trials share the searched
    params that fix tensor shapes (`Shape`), so the loop fuses them into one
    forward pass; for the others the sampler proposes what it would
    for as many parallel workers (TPE's constant liar steers it away from the
    running ones). Until tune.startup_trials trials have finished, a population
    holds at most that many, each with its own shape: before then the sampler
    proposes at random (and the median pruner prunes nothing), so more members
    would train uninformed trials (measured with the median pruner: +25-75%
    epochs for the same search).
    """
    tune, open_runs, full = search.cfg.tune, [], False
    shape = Shape()
    explored = False  # tune.startup_trials have finished (for good: finished trials stay finished)
    if search.population > 1 and search.prepared.train.streamed:
        print("[tune] streamed data: trials train one at a time (each member of a population would start its own "
              f"{search.cfg.data.loader_workers} reader process(es))", file=sys.stderr, flush=True)

    def next_runs(ended: list[loop.Run], training: int) -> list[loop.Run]:
        nonlocal full, explored
        for done in ended:  # a done run's key is its TrialRun
            open_runs.remove(done.key)
            done.key.finish(done.result, done.error)
            if done.error is not None and not isinstance(done.error, (optuna.TrialPruned, *TRIAL_FAILURES)):
                raise done.error  # not the trial's params: the worker stops (the others are failed below)
        joining = []
        size = 1 if any(run.alone for run in open_runs) else search.population
        if training < size and not explored:  # room for more: is the sampler still exploring at random?
            explored = _counts(search.study)[0] >= tune.startup_trials
            if not explored and size > tune.startup_trials:
                size = max(1, tune.startup_trials)
        while training + len(joining) < size and not full and not _past(deadline):
            run = shape.next_run(search, hold=explored)
            if run is None or run is False:  # the study is full, or the rest are running elsewhere
                full = run is None
                break
            open_runs.append(run)
            joining.append(run.start())
            if run.alone:
                size = 1  # no company until it is done
                shape.forget()
        return joining

    try:
        population.fit_together([], search.device, next_runs)
    except BaseException as err:  # e.g. out of GPU memory, Ctrl-C: every trial still training fails with it
        traceback.clear_frames(err.__traceback__)  # an open storage query's read lock would block the tells
        for run in open_runs:
            run.finish(None, err)
        for trial_id in list(search.running):  # asked, but interrupted before it became a TrialRun
            _fail(search.storage, trial_id, f"stopped before it started: {first_line(err)}")
            search.running.discard(trial_id)
        if not isinstance(err, TRIAL_FAILURES):
            raise
        if isinstance(err, torch.cuda.OutOfMemoryError) and len(open_runs) > 1:
            search.population = max(1, len(open_runs) // 2)  # its failed trials are not counted: no endless retry
            print(f"[tune] out of device memory with {len(open_runs)} trials at once: now at most "
                  f"{search.population}", file=sys.stderr, flush=True)
    finally:
        if search.device.type == "cuda":  # the next trials may build bigger models (a full collection: ~0.3 s)
            gc.collect()
            torch.cuda.empty_cache()
    return full


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


@contextlib.contextmanager
def heartbeats(search: Search):
    """Record heartbeats of this process's running trials (RDB storages, gRPC proxy), as `study.optimize` would."""
    storage = search.storage
    interval = search.cfg.tune.heartbeat_interval
    if not isinstance(storage, (optuna.storages.RDBStorage, optuna.storages.GrpcStorageProxy)):
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            for trial_id in list(search.running):
                with contextlib.suppress(Exception):  # a finished trial's last beat may race its tell
                    _beat(storage, trial_id)

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_worker(search: Search) -> bool:
    """Run trials until the study holds n_trials finished ones; False if this worker's timeout came first."""
    timeout = search.cfg.tune.timeout
    deadline = time.monotonic() + timeout if timeout else None
    with heartbeats(search):
        while not _past(deadline):
            if run_population(search, deadline):
                return True
            if not _past(deadline):
                time.sleep(POLL_S)  # the study's last trials are running elsewhere: they may fail and be retried
    return False


# ---------------------------------------------------------------- the stage

def work(cfg: Config, prepared_dir: Path) -> None:
    """One of several worker processes started by `tune`: trials only, no reports."""
    search = open_search(cfg, prepared_dir)
    search.parent_run_id = search.study.user_attrs.get("mlflow_parent_run_id") if cfg.tracking.enabled else None
    run_worker(search)


def tune(cfg: Config, prepared_dir: Path, worker_args: list[str]) -> dict:
    """Run the search with `tune.workers` processes, then write reports; returns the best-params record."""
    if not cfg.tune.space:
        raise UserError("tune.space is empty: declare at least one param to search")
    search = open_search(cfg, prepared_dir)
    study = search.study
    finished, _, _ = _counts(study)
    print(f"[tune] study {study.study_name} on {redact(storage_url(cfg.tune))}: {finished}/{cfg.tune.n_trials} "
          f"trials finished so far, {cfg.tune.workers} worker(s)", flush=True)
    with _parent_run(search) as parent:
        if cfg.tune.workers > 1:
            _run_worker_processes(cfg.tune.workers, worker_args)
        complete = run_worker(search)  # alone, or after the workers: runs whatever they left (retries)
        _close_runs_of_dead_trials(search)
        best = _best_trial(study)
        record = {"study": study.study_name, "metric": cfg.tune.metric, "direction": cfg.tune.direction,
                  "value": best.value, "trial": best.number, "params": decoded_params(best, cfg.tune.space)}
        write_reports(study, record, cfg)
        if parent:
            parent.log_metrics({f"best_{cfg.tune.metric}": best.value})
            parent.set_tags({"optuna.best_trial": best.number})
            parent.log_artifacts(paths.BEST_PARAMS, paths.TRIALS_CSV, *sorted(paths.TUNE_PLOTS.glob("*.png")))
    counts = {state.name.lower(): n for state in TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(state,))))}
    print(f"[tune] best trial {best.number}: {cfg.tune.metric} {best.value:.4f} with {record['params']} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
    if not complete:
        print(f"[tune] tune.timeout ({cfg.tune.timeout:g}s) reached with {_counts(study)[0]}/{cfg.tune.n_trials} "
              "trials finished; the best so far is reported, and running `tune` again continues", flush=True)
    return record


@contextlib.contextmanager
def _parent_run(search: Search):
    """The study's one MLflow parent run: created once (under the study lock), shared by every process."""
    cfg, study = search.cfg, search.study
    if not cfg.tracking.enabled:
        yield None
        return
    from pipeline import tracking

    with search.lock:
        existing = study.user_attrs.get("mlflow_parent_run_id")
        client = tracking.connect(cfg.tracking)
        if not (existing and tracking.run_exists(client, existing)):
            with tracking.TrackedRun(cfg, study.study_name, "study", search.prepared.md5, own_process=False,
                                     tags={"optuna.study": study.study_name,
                                           "optuna.storage": redact(storage_url(cfg.tune))}) as created:
                existing = created.run_id
            study.set_user_attr("mlflow_parent_run_id", existing)
    search.parent_run_id = existing
    # Shared by every process of the study: none of them owns it, so none is judged dead for it.
    with tracking.TrackedRun(cfg, study.study_name, "study", search.prepared.md5, continue_run_id=existing,
                             own_process=False) as run:
        yield run


def _close_runs_of_dead_trials(search: Search) -> None:
    """A trial failed for its dead process (here or on another machine) leaves its MLflow run RUNNING: close it."""
    if not search.cfg.tracking.enabled:
        return
    from pipeline import tracking

    client = tracking.connect(search.cfg.tracking)
    for trial in search.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if "mlflow_run_id" in trial.user_attrs:
            tracking.close_if_running(client, trial.user_attrs["mlflow_run_id"],
                                      f"trial {trial.number} failed: {trial.user_attrs.get('fail_reason', 'its process died')}")


def _run_worker_processes(workers: int, worker_args: list[str]) -> None:
    command = [sys.executable, "-m", "pipeline", "tune", "--worker", *worker_args]
    children = [subprocess.Popen(command) for _ in range(workers)]
    try:
        codes = [process.wait() for process in children]
    except KeyboardInterrupt:
        for process in children:
            process.terminate()
        for process in children:
            process.wait()
        raise
    if any(codes):  # this process finishes what they left; it fails only if the study cannot complete
        print(f"[tune] worker exit codes {codes}; finishing the study in this process", file=sys.stderr, flush=True)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"tune: no trial of study {study.study_name} completed; see the trial lines above "
                        f"and the trials' fail_reason") from None


# ---------------------------------------------------------------- reports

def trial_rows(study: optuna.Study, cfg: Config) -> tuple[list[str], list[list]]:
    """trials.csv: number, state, value, the pruning epoch and the params; deterministic (no times, no run ids)."""
    keys = list(cfg.tune.space)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        last = max(trial.intermediate_values, default="")
        params = decoded_params(trial, cfg.tune.space) if trial.params else {}
        rows.append([trial.number, trial.state.name, "" if trial.value is None else round(trial.value, 6), last,
                     trial.user_attrs.get("fail_reason", ""), *(params.get(key, "") for key in keys)])
    return ["number", "state", cfg.tune.metric, "epochs", "fail_reason", *keys], rows


def write_reports(study: optuna.Study, record: dict, cfg: Config) -> None:
    """best_params.json, trials.csv, and Optuna's own plots as readable PNGs."""
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline import reporting

    files.write_json(paths.BEST_PARAMS, record)
    files.write_csv(paths.TRIALS_CSV, *trial_rows(study, cfg))
    plt = reporting.pyplot()
    metric = cfg.tune.metric
    log_scale = metric == "val_loss"  # good losses differ by factors, not by a constant
    plots = {"optimization_history": optuna_plots.plot_optimization_history,
             "param_importances": optuna_plots.plot_param_importances,
             "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
             "intermediate_values": optuna_plots.plot_intermediate_values}
    options = {"optimization_history": {"target_name": metric}, "parallel_coordinate": {"target_name": metric},
               # fANOVA fits a random forest: seeded, or the same trials draw another picture every run
               "param_importances": {"target_name": metric,
                                     "evaluator": optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed)}}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. a param with one value so far: flat axis
                axes = plot(study, **options.get(name, {}))
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            print(f"[tune] skipped {name} plot: {err}", file=sys.stderr)
            continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = ax.get_figure()
        figure.set_size_inches(11, 5.5)
        if name in ("optimization_history", "intermediate_values") and log_scale:
            ax.set_yscale("log")
        if name == "intermediate_values":
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{metric} per epoch (pruned trials stop early)")
            if ax.get_legend():
                ax.get_legend().remove()  # one line per trial: a 24-entry legend hides the lines
        if name == "parallel_coordinate":
            for label in ax.get_xticklabels():
                label.set_rotation(20)
                label.set_horizontalalignment("right")
        figure.text(0.995, 0.995, f"study {study.study_name}", ha="right", va="top", fontsize=8, color="0.4")
        reporting.save_figure(figure, paths.TUNE_PLOTS / f"{name}.png")
    plt.close("all")
