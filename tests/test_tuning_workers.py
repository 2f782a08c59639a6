"""Several processes on one study: workers, simultaneous starts, interrupts and a killed last trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from optuna.trial import TrialState

from helpers import edit_params, run_cli
from helpers.searches import CONTINUOUS, FINISHED, TINY_SEARCH, load_only_study, states, storage_for

pytestmark = pytest.mark.slow


def test_four_workers_finish_exactly_n_trials_all_different(search_repo, tracked_env):
    repo, storage = search_repo
    # each worker trains a population of 2: up to 8 trials at once, still exactly n_trials
    edit_params(repo, {"tune.space": CONTINUOUS, "tune.sampler": "random", "tune.population": 2})
    result = run_cli("tune", "--workers", "4", "--set", "tune.n_trials=10", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    assert "locked" not in result.stderr.lower()
    study = load_only_study(storage)
    assert len(study.trials) == 10 and all(state in FINISHED for state in states(study))
    proposals = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(proposals) == 10, "workers proposed the same params"  # each process draws its own sampler seed


def test_interrupted_search_resumes_with_new_proposals_and_without_repeating_trials(search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.epochs": 8, "tune.warmup_epochs": 100, "tune.space": CONTINUOUS,
                       "tune.sampler": "random", "tune.population": 1})  # slower trials, none pruned, one at a time
    process = start_tune(repo, "--set", "tune.n_trials=6", env=tracked_env)
    deadline = time.monotonic() + 120
    while len(completed(storage)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 143
    before = {t.number: t.value for t in completed(storage)}
    assert 3 <= len(before) < 6

    result = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    complete = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    assert {n: complete[n] for n in before} == before  # finished trials kept, not re-run
    assert len(complete) == 6
    assert all(s in (TrialState.COMPLETE, TrialState.FAIL) for s in states(study))
    assert states(study).count(TrialState.FAIL) <= 1  # at most the trial that was running when it was killed
    proposals = [tuple(sorted(t.params.items())) for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(set(proposals)) == 6, "the resumed search repeated earlier proposals"


def test_sigterm_during_a_population_keeps_finished_trials_and_marks_the_interrupted_ones(search_repo, tracked_env):
    """SIGTERM while a population trains: the trials that finished keep their values and FINISHED runs; those
    still training are failed in the study and their runs KILLED, as a sequential search leaves them; a re-run
    finishes the study without re-running the finished ones."""
    repo, storage = search_repo
    edit_params(repo, {"model.name": "cnn", "tune.epochs": 20, "tune.warmup_epochs": 100, "tune.startup_trials": 0,
                       "tune.space": CONTINUOUS, "tune.sampler": "random", "tune.population": 3})
    process = start_tune(repo, "--set", "tune.n_trials=6", env=tracked_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # mid-way, at most half of its 20 epochs reported: not a trial of the first population being told it
        # finished (its last epochs' values may land after a sibling's tell; a population trains in lockstep, so
        # none of it is at epoch 10 once one has finished)
        midway = [t for t in training(storage, CONTINUOUS)
                  if "mlflow_run_id" in t.user_attrs and 1 <= len(t.intermediate_values) <= 10]
        if completed(storage) and len(midway) >= 2:
            break  # a population trains, after a trial of the search finished
        time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError("no second population was seen training within 120 s")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 143
    study = load_only_study(storage)
    finished = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    assert finished and TrialState.RUNNING not in states(study)
    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    killed = 0
    for trial in study.trials:
        if "mlflow_run_id" not in trial.user_attrs:  # asked as the signal came, before its run began: no run
            assert trial.state == TrialState.FAIL
            continue
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        killed += run.info.status == "KILLED"
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(trial.intermediate_values)
    assert killed >= 1 and client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"

    result = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    assert {n: t.value for n, t in enumerate(study.trials) if n in finished} == finished
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 6


def start_tune(repo, *overrides, env=None):
    """A `tune` process, returned once its storage and study exist (polling them earlier would race their creation)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *overrides], cwd=repo, text=True,
                               env={**os.environ, **(env or {})}, stdout=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith("[tune] study"):
            return process
    raise AssertionError(f"tune exited with {process.wait()} before opening its study")


def training(storage, space):
    """A running trial that has all its params (it trains): not one just asked, before its params are sampled."""
    return [t for t in load_only_study(storage).trials if t.state == TrialState.RUNNING and set(t.params) == set(space)]


def completed(storage):
    try:
        return [t for t in load_only_study(storage).trials if t.state == TrialState.COMPLETE]
    except (ValueError, KeyError):
        return []


@pytest.mark.parametrize("kind", ["journal"])  # no heartbeats there: only the dead process tells (RDB: test_machines)
def test_a_sigkilled_last_trial_is_failed_retried_and_the_study_finished_by_a_rerun(search_repo, tracked_env,
                                                                                   tmp_path, kind):
    repo, _ = search_repo
    storage = storage_for(kind, tmp_path / kind)
    (tmp_path / kind).mkdir()
    edit_params(repo, {"model.name": "cnn", "tune.epochs": 30, "tune.warmup_epochs": 100, "tune.storage": storage,
                       "tune.space": CONTINUOUS, "tracking.enabled": False,
                       "tune.population": 1})  # one trial at a time: the second is the last one running
    # two trials of a few seconds each: kill the process during the second, the last one, as a power cut would
    process = start_tune(repo, "--set", "tune.n_trials=2")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(completed(storage)) == 1 and training(storage, CONTINUOUS)):
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=30)
    assert states(load_only_study(storage)) == [TrialState.COMPLETE, TrialState.RUNNING]

    result = run_cli("tune", "--set", "tune.n_trials=2", cwd=repo)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    assert [t.state for t in study.trials if t.state in FINISHED] == [TrialState.COMPLETE] * 2
    failed, = [t for t in study.trials if t.state == TrialState.FAIL]
    assert "died" in failed.user_attrs["fail_reason"]
    retry, = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params


# `tune` in a process that dies (as by SIGKILL: no cleanup) the moment its first trial's MLflow run is open, before
# the run is recorded on the trial
DIES_WITH_ITS_RUN_OPEN = (
    "import os, sys, optuna; from pipeline import cli; record = optuna.trial.Trial.set_user_attr; "
    "optuna.trial.Trial.set_user_attr = lambda trial, key, value: "
    "os._exit(9) if key == 'mlflow_run_id' else record(trial, key, value); "
    "sys.exit(cli.main(['tune', '--set', 'tune.n_trials=1']))")


def test_a_run_opened_just_before_its_process_died_is_closed_by_the_machine_that_fails_its_trial(search_repo,
                                                                                               tracked_env):
    """Killed between opening a trial's MLflow run and recording the run on the trial (test_machines' kill can land
    there): the process of another machine that fails the trial by its heartbeats also closes that run, found by
    the run's trial tag."""
    repo, storage = search_repo
    edit_params(repo, {"tune.heartbeat_interval": 1, "tune.grace_period": 2})
    died = subprocess.run([sys.executable, "-c", DIES_WITH_ITS_RUN_OPEN], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **tracked_env, "PIPELINE_HOSTNAME": "machine-a"})
    assert died.returncode == 9, died.stderr
    dead, = load_only_study(storage).trials
    assert dead.state == TrialState.RUNNING and "mlflow_run_id" not in dead.user_attrs
    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    orphan, = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`pipeline.role` = 'trial'")
    assert orphan.info.status == "RUNNING"

    # machine-b cannot see machine-a's processes: only the missing heartbeats tell it the trial is dead
    result = run_cli("tune", "--set", "tune.n_trials=1", cwd=repo,
                     env={**tracked_env, "PIPELINE_HOSTNAME": "machine-b"})
    assert result.returncode == 0, result.stderr
    failed, retry = load_only_study(storage).trials
    assert failed.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == failed.number
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED", "the dead trial's run was left RUNNING"
    assert closed.data.tags["pipeline.end_reason"].startswith("its trial failed")
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_three_tune_processes_started_at_once_on_a_fresh_storage(prepared_repo, tracked_env, tmp_path, kind):
    repo_copy = prepared_repo
    storage = storage_for(kind, tmp_path)
    edit_params(repo_copy, {**TINY_SEARCH, "tune.space": CONTINUOUS, "tune.storage": storage})
    # a fresh MLflow store too: the processes race to make its schema as they race to make the study
    Path(tracked_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).unlink()
    command = [sys.executable, "-m", "pipeline", "tune", "--set", "tune.n_trials=6"]
    processes = [subprocess.Popen(command, cwd=repo_copy, env={**os.environ, **tracked_env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    study = load_only_study(storage)
    assert sum(state in FINISHED for state in states(study)) == 6
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`pipeline.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert json.loads((repo_copy / "reports/tune/best_params.json").read_text())["study"] == study.study_name
    assert not [p for p in (repo_copy / "reports/tune").rglob("*.tmp")]
