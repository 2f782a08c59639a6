"""The Optuna stage on real storages (SQLite, journal file) and a real MLflow store, tiny settings."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from conftest import edit_params, run_cli

pytestmark = pytest.mark.slow

# lr 1e-6 learns nothing, so the median pruner has something to prune
TINY_SEARCH = {"models": ["logreg"], "model.name": "mlp", "tune.epochs": 3, "tune.startup_trials": 2,
               "tune.warmup_epochs": 1, "tracking.log_models": False,
               "tune.space": {"train.lr": {"choices": [1.0e-6, 3.0e-3]}, "model.dropout": {"low": 0.0, "high": 0.3}}}


@pytest.fixture
def search_repo(repo_copy, tracked_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    edit_params(repo_copy, {**TINY_SEARCH, "tune.storage": storage})
    run_cli("prepare", cwd=repo_copy, check=True, env=tracked_env)
    return repo_copy, storage


def load_only_study(storage):
    name, = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def states(study):
    return [t.state for t in study.trials]


def test_tune_writes_best_params_with_nested_mlflow_runs(search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.sampler": "random"})  # seeded: a hopeless lr comes after the startup trials
    result = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    assert study.study_name.startswith("digits-mlp-")
    assert len(study.trials) == 6 and TrialState.PRUNED in states(study)

    best = json.loads((repo / "reports/tune/best_params.json").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert set(best["params"]) == {"train.lr", "model.dropout"} and best["params"]["train.lr"] == 3.0e-3
    assert {"trials.csv", "optimization_history.png"} <= {p.name for p in (repo / "reports/tune").iterdir()}

    parent_id = study.user_attrs["mlflow_parent_run_id"]
    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    assert client.get_run(parent_id).info.status == "FINISHED"
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.study"] == study.study_name
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(trial.intermediate_values)

    again = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert again.returncode == 0 and "[tune] trial-" not in again.stdout  # nothing left to run
    final = run_cli("train", "--final", "--tuned", "reports/tune/best_params.json", cwd=repo, env=tracked_env)
    assert final.returncode == 0 and f"using trial {best['trial']}" in final.stdout


def test_four_workers_finish_exactly_n_trials(search_repo, tracked_env):
    repo, storage = search_repo
    result = run_cli("tune", "--workers", "4", "--set", "tune.n_trials=10", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    assert "locked" not in result.stderr.lower()
    study = load_only_study(storage)
    assert len(study.trials) == 10
    assert all(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states(study))


def test_interrupted_search_resumes_without_repeating_trials(search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.epochs": 8, "tune.warmup_epochs": 8})  # slower trials, none pruned
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--set", "tune.n_trials=6"], cwd=repo,
                               env={**os.environ, **tracked_env}, stdout=subprocess.DEVNULL)

    def completed():
        names = optuna.get_all_study_names(storage) if (repo.parent / "optuna.db").exists() else []
        return [t for t in load_only_study(storage).trials if t.state == TrialState.COMPLETE] if names else []

    deadline = time.monotonic() + 120
    while len(completed()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 143
    before = {t.number: t.value for t in completed()}
    assert 2 <= len(before) < 6

    result = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    complete = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    assert {n: complete[n] for n in before} == before  # finished trials kept, not re-run
    assert len(complete) == 6
    assert all(s in (TrialState.COMPLETE, TrialState.FAIL) for s in states(study))
    assert states(study).count(TrialState.FAIL) <= 1  # at most the trial that was running when it was killed


def test_diverging_trials_fail_with_reason_and_the_study_goes_on(search_repo, tracked_env, tmp_path):
    repo, _ = search_repo
    journal = tmp_path / "search.journal"
    space = {"train.lr": {"choices": [1.0e12, 3.0e-3]}, "train.optimizer": {"choices": ["sgd"]}}
    edit_params(repo, {"tune.space": space, "tune.storage": str(journal), "tune.pruner": "none"})
    result = run_cli("tune", "--set", "tune.n_trials=3", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all("training loss became" in t.user_attrs["fail_reason"] for t in failed)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 3
    assert json.loads((repo / "reports/tune/best_params.json").read_text())["params"]["train.lr"] == 3.0e-3


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    from pipeline import stages
    from pipeline.config import load_config
    from conftest import REPO

    root = tmp_path_factory.mktemp("prepared")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stages.prepare(load_config(REPO / "params.yaml"))
    finally:
        os.chdir(cwd)
    return root / "data/prepared"


@pytest.mark.parametrize("sampler, pruner", [("tpe", "median"), ("random", "hyperband"),
                                             ("cmaes", "successive_halving"), ("gp", "none")])
def test_every_sampler_and_pruner_runs_a_search(prepared_digits, tmp_path, sampler, pruner):
    from pipeline import tuning
    from pipeline.config import load_config
    from conftest import REPO

    cfg = load_config(REPO / "params.yaml", [
        "model.name=mlp", "tune.epochs=3", "tune.n_trials=4", "tune.startup_trials=2", "tune.warmup_epochs=1",
        f"tune.sampler={sampler}", f"tune.pruner={pruner}", f"tune.storage={tmp_path / 'search.journal'}",
        "tracking.enabled=false", "train.device=cpu"])
    record = tuning.tune(cfg, prepared_digits, tmp_path / "reports", worker_args=[])
    study = optuna.load_study(study_name=record["study"], storage=tuning.open_storage(cfg.tune))
    assert len(study.trials) == 4 and record["trial"] == study.best_trial.number
    assert set(record["params"]) == set(cfg.tune.space)
    assert (tmp_path / "reports/best_params.json").exists()


def test_timeout_stops_starting_trials(prepared_digits, tmp_path):
    from pipeline import tuning
    from pipeline.config import load_config
    from conftest import REPO

    cfg = load_config(REPO / "params.yaml", [
        "model.name=logreg", "tune.epochs=2", "tune.n_trials=1000", "tune.timeout=2",
        f"tune.storage={tmp_path / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    started = time.monotonic()
    record = tuning.tune(cfg, prepared_digits, tmp_path / "reports", worker_args=[])
    study = optuna.load_study(study_name=record["study"], storage=tuning.open_storage(cfg.tune))
    assert 1 <= len(study.trials) < 1000 and time.monotonic() - started < 60
