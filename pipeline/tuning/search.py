"""A search: populations of trials through the shared loop, one or several worker processes, then reports.

Trials are driven by ask/tell, so any number of processes (and machines) can
work on one study; a run of `tune` finishes whatever the study lacks, waits for
trials other processes are still running, and fails only if the study cannot
complete. Untracked searches never import MLflow.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import subprocess
import sys
import time
import traceback
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from pipeline import loop, paths, population
from pipeline.config import Config
from pipeline.errors import UserError, first_line, redact
from pipeline.tuning.confirm import confirm
from pipeline.tuning.reports import write_reports
from pipeline.tuning.space import decoded_params
from pipeline.tuning.storage import counts, fail, heartbeats, storage_url
from pipeline.tuning.study import STUDY_TAG, TRIAL_TAG, Search, open_search
from pipeline.tuning.trials import TRIAL_FAILURES, NoTrial, SharedParams

POLL_S = 2.0  # how often a worker with nothing to start looks again


def run_population(search: Search, deadline: float | None) -> bool:
    """Train up to tune.population trials at once through the loop; True when the study needs no more of them.

    A slot freed by a finished or pruned trial goes at once to the next trial the
    study asks for, while the others train on. The trials share the searched
    params that fix tensor shapes (`SharedParams`), so the engine fuses them
    into one forward pass; for the others the sampler proposes what it would
    for as many parallel workers (TPE's constant liar steers it away from the
    running ones). Until tune.startup_trials trials have finished, a population
    holds at most that many, each drawing its own: before then the sampler
    proposes at random, blind to how the others do, so a larger population
    would only train more uninformed trials.
    """
    tune, open_runs, full = search.cfg.tune, [], False
    held = SharedParams()
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
            explored = counts(search.study)[0] >= tune.startup_trials
            if not explored and size > tune.startup_trials:
                size = max(1, tune.startup_trials)
        while training + len(joining) < size and not full and not past(deadline):
            run = held.next_run(search, hold=explored)
            if isinstance(run, NoTrial):
                full = run is NoTrial.FULL
                break
            open_runs.append(run)
            joining.append(run.start())
            if run.alone:
                size = 1  # no company until it is done
                held.forget()
        return joining

    try:
        population.fit_together([], search.device, next_runs)
    except BaseException as err:  # e.g. out of GPU memory, Ctrl-C: every trial still training fails with it
        traceback.clear_frames(err.__traceback__)  # an open storage query's read lock would block the tells
        for run in open_runs:
            run.finish(None, err)
        for trial_id in list(search.running):  # asked, but interrupted before it became a TrialRun
            fail(search.storage, trial_id, f"stopped before it started: {first_line(err)}")
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


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def run_worker(search: Search) -> bool:
    """Run trials until the study holds n_trials finished ones; False if this worker's timeout came first."""
    timeout = search.cfg.tune.timeout
    deadline = time.monotonic() + timeout if timeout else None
    with heartbeats(search.storage, search.cfg.tune.heartbeat_interval, search.running):
        while not past(deadline):
            if run_population(search, deadline):
                return True
            if not past(deadline):
                time.sleep(POLL_S)  # the study's last trials are running elsewhere: they may fail and be retried
    return False


def work(cfg: Config, prepared_dir: Path) -> None:
    """One of several worker processes started by `tune`: trials only, no reports."""
    search = open_search(cfg, prepared_dir)
    search.parent_run_id = search.study.user_attrs.get("mlflow_parent_run_id") if cfg.tracking.enabled else None
    run_worker(search)


def tune(cfg: Config, prepared_dir: Path, worker_args: list[str]) -> dict:
    """Run the search with `tune.workers` processes, then write reports; returns the best-params record."""
    if not cfg.tune.space:
        raise UserError("tune.space is empty: declare at least one param to search")
    if cfg.tune.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("tune.engine ray needs Ray Tune, which is not installed: pip install -e '.[ray]'")
    search = open_search(cfg, prepared_dir)
    study = search.study
    finished, _, _ = counts(study)
    who = "Ray Tune" if cfg.tune.engine == "ray" else f"{cfg.tune.workers} worker(s)"
    print(f"[tune] study {study.study_name} on {redact(storage_url(cfg.tune))}: {finished}/{cfg.tune.n_trials} "
          f"trials finished so far, {who}", flush=True)
    with _parent_run(search) as parent:
        if cfg.tune.engine == "ray":
            from pipeline.tuning import ray_engine

            complete = ray_engine.run(search)
        else:
            if cfg.tune.workers > 1:
                _run_worker_processes(cfg.tune.workers, worker_args)
            complete = run_worker(search)  # alone, or after the workers: runs whatever they left (retries)
        _close_runs_of_dead_trials(search)
        best = _best_trial(study)
        confirmation = confirm(search) if complete else None
        shipped = study.trials[confirmation["shipped"]] if confirmation else best
        record = {"study": study.study_name, "metric": cfg.tune.metric, "direction": cfg.tune.direction,
                  "value": shipped.value, "trial": shipped.number, "params": decoded_params(shipped, cfg.tune.space),
                  **({"confirmation": confirmation} if confirmation else {})}
        write_reports(study, record, cfg)
        if parent:
            parent.log_metrics({f"best_{cfg.tune.metric}": best.value})
            parent.set_tags({"optuna.best_trial": best.number, "optuna.shipped_trial": shipped.number,
                             **({"confirm.why": confirmation["why"]} if confirmation else {})})
            parent.log_artifacts(paths.BEST_PARAMS, paths.TRIALS_CSV, *sorted(paths.TUNE_PLOTS.glob("*.png")))
    states = {state.name.lower(): n for state in TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(state,))))}
    print(f"[tune] best trial {best.number}: {cfg.tune.metric} {best.value:.4f} "
          f"({', '.join(f'{k} {v}' for k, v in states.items())})", flush=True)
    why = f" (over seeds {confirmation['seeds']}: {confirmation['why']})" if confirmation else ""
    print(f"[tune] ships trial {shipped.number}{why}: {record['params']}", flush=True)
    if not complete:
        print(f"[tune] tune.timeout ({cfg.tune.timeout:g}s) reached with {counts(study)[0]}/{cfg.tune.n_trials} "
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
                                     tags={STUDY_TAG: study.study_name,
                                           "optuna.storage": redact(storage_url(cfg.tune))}) as created:
                existing = created.run_id
            study.set_user_attr("mlflow_parent_run_id", existing)
    search.parent_run_id = existing
    # Shared by every process of the study: none of them owns it, so none is judged dead for it.
    with tracking.TrackedRun(cfg, study.study_name, "study", search.prepared.md5, continue_run_id=existing,
                             own_process=False) as run:
        yield run


def _close_runs_of_dead_trials(search: Search) -> None:
    """A trial failed for its dead process (here or on another machine) leaves its MLflow run RUNNING: close it.
    Found by the run's own trial tag, not the trial's `mlflow_run_id`: a process killed between opening the run and
    recording it on the trial leaves a run the trial does not name."""
    if not (search.cfg.tracking.enabled and search.parent_run_id):
        return
    from pipeline import tracking

    client = tracking.connect(search.cfg.tracking)
    reasons = {str(trial.number): f"its trial failed: {trial.user_attrs.get('fail_reason', 'its process died')}"
               for trial in search.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    tracking.close_running_children(client, search.parent_run_id, TRIAL_TAG, reasons)


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
