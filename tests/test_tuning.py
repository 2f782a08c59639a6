"""The Optuna stage on real storages (SQLite, journal file) and a real MLflow store, tiny settings."""

import json
import re
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO, edit_params, run_cli
from helpers.searches import CONTINUOUS, load_only_study, states

pytestmark = pytest.mark.slow

def has_hparams(board: EventAccumulator) -> bool:
    try:
        return "_hparams_/session_start_info" in board.PluginTagToContent("hparams")
    except KeyError:  # no HParams summary in this run
        return False


def test_tune_writes_best_params_with_nested_mlflow_runs(search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.sampler": "random"})  # seeded: a hopeless lr comes after the startup trials
    result = run_cli("tune", "--set", "tune.n_trials=6", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    assert study.study_name.startswith("digits-mlp-") and study.metric_names == ["val_loss"]
    assert len(study.trials) == 6 and TrialState.PRUNED in states(study)
    for line in (line for line in result.stdout.splitlines() if line.startswith("[tune] trial")):
        # the epochs it trained and their time (not its wait for a place in a population), then its params
        assert re.match(r"\[tune\] trial +\d+ (COMPLETE|PRUNED  ) val_loss \d+\.\d{4}(| at epoch \d+), \d+ epochs? in "
                        r"\d+\.\ds( in a population of up to \d+)?  train\.lr=", line), line

    best = json.loads((repo / "reports/tune/best_params.json").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert set(best["params"]) == {"train.lr", "model.dropout"} and best["params"]["train.lr"] == 3.0e-3
    assert {"optimization_history.png", "param_importances.png"} <= {p.name for p in (repo / "reports/tune/plots")
                                                                     .iterdir()}
    trials = (repo / "reports/tune/trials.csv").read_text().splitlines()
    assert trials[0] == "number,state,val_loss,epochs,fail_reason,train.lr,model.dropout" and len(trials) == 7

    # each trial is a TensorBoard run too: the epochs the study heard of, and the completed ones in HParams
    for trial in study.trials:
        board = EventAccumulator(str(repo / "runs" / "digits" / f"{study.study_name}-trial-{trial.number:03d}"))
        board.Reload()
        assert [event.step for event in board.Scalars("val_loss")] == sorted(trial.intermediate_values)
        assert has_hparams(board) == (trial.state == TrialState.COMPLETE)

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
    assert again.returncode == 0 and "[tune] trial" not in again.stdout  # nothing left to run
    final = run_cli("train", "--final", "--tuned", "reports/tune/best_params.json", cwd=repo, env=tracked_env)
    assert final.returncode == 0 and f"trains with trial {best['trial']}'s params" in final.stdout


def test_a_population_search_looks_like_trials_run_one_at_a_time(search_repo, tracked_env):
    """tune.population trains trials together; the study and MLflow still show one trial, one run, full curves."""
    repo, storage = search_repo
    edit_params(repo, {"tune.sampler": "random", "tune.population": 3})
    result = run_cli("tune", "--set", "tune.n_trials=8", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    assert len(study.trials) == 8 and all(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states(study))
    assert TrialState.PRUNED in states(study)
    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    runs = {trial.number: client.get_run(trial.user_attrs["mlflow_run_id"]) for trial in study.trials}
    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == trial.state.name
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
        assert [m.value for m in history] == [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
    # trained together: after the startup trials (2) a trial starts before the one before it ends
    overlaps = [n for n in range(3, 8) if runs[n].info.start_time < runs[n - 1].info.end_time]
    assert overlaps, "no two trials trained at the same time"


def test_the_untuned_settings_are_the_first_trial(search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.space": CONTINUOUS, "tracking.enabled": False})
    result = run_cli("tune", "--set", "tune.n_trials=2", cwd=repo)
    assert result.returncode == 0, result.stderr
    first = load_only_study(storage).trials[0]
    assert first.params == {"train.lr": 0.001, "model.dropout": 0.2} and first.user_attrs["origin"] == "params.yaml"


def test_diverging_trials_fail_with_reason_and_the_study_goes_on(search_repo, tracked_env, tmp_path):
    repo, _ = search_repo
    journal = tmp_path / "search.journal"
    space = {"train.lr": {"choices": [1.0e12, 3.0e-3]}, "train.optimizer": {"choices": ["sgd"]}}
    edit_params(repo, {"tune.space": space, "tune.storage": str(journal), "tune.pruner": "none"})
    result = run_cli("tune", "--set", "tune.n_trials=3", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(str(journal))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all("training loss became" in t.user_attrs["fail_reason"] for t in failed)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 3
    assert json.loads((repo / "reports/tune/best_params.json").read_text())["params"]["train.lr"] == 3.0e-3


@pytest.fixture
def in_prepared_repo(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.stages.prepare import prepare

    monkeypatch.chdir(tmp_path)
    prepare(load_config(REPO / "params.yaml"))
    return tmp_path


@pytest.mark.parametrize("sampler, pruner", [("tpe", "median"), ("random", "hyperband"),
                                             ("cmaes", "successive_halving"), ("gp", "none")])
def test_every_sampler_and_pruner_runs_a_search(in_prepared_repo, sampler, pruner):
    from pipeline import paths, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=mlp", "tune.epochs=3", "tune.n_trials=4", "tune.startup_trials=2", "tune.warmup_epochs=1",
        f"tune.sampler={sampler}", f"tune.pruner={pruner}", f"tune.storage={in_prepared_repo / 'search.journal'}",
        "tracking.enabled=false", "train.device=cpu"])
    record = tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    study = optuna.load_study(study_name=record["study"], storage=tuning.open_storage(cfg.tune))
    assert len(study.trials) == 4 and record["trial"] == study.best_trial.number
    opened = tuning.open_search(cfg, paths.PREPARED_DIR).study
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler}
    pruners = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner, "none": optuna.pruners.NopPruner}
    assert type(opened.sampler) is samplers[sampler] and type(opened.pruner) is pruners[pruner]
    assert set(record["params"]) == set(cfg.tune.space) and paths.BEST_PARAMS.exists()


def test_untracked_tune_never_imports_mlflow(in_prepared_repo):
    result = subprocess.run([sys.executable, "-c", (
        "import sys; from pipeline import cli; "
        "code = cli.main(['tune', '--params', sys.argv[1], '--set', 'tracking.enabled=false', "
        "'--set', 'tune.n_trials=1', '--set', 'tune.epochs=1', '--set', 'model.name=logreg', "
        f"'--set', 'tune.storage={in_prepared_repo / 's.journal'}']); "
        "assert code == 0, code; assert 'mlflow' not in sys.modules, 'mlflow imported'"), str(REPO / "params.yaml")],
        cwd=in_prepared_repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_timeout_stops_starting_trials(in_prepared_repo):
    from pipeline import paths, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=logreg", "tune.epochs=2", "tune.n_trials=1000", "tune.timeout=2",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    started = time.monotonic()
    record = tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    study = optuna.load_study(study_name=record["study"], storage=tuning.open_storage(cfg.tune))
    assert 1 <= len(study.trials) < 1000 and time.monotonic() - started < 60


def test_a_population_out_of_device_memory_fails_its_trials_and_halves(in_prepared_repo, monkeypatch, capsys):
    """Out of GPU memory in a fused step: every trial of the population fails with the reason, the worker goes on
    with half as many at once (failed trials are not counted, so it would otherwise retry the same size forever)."""
    from pipeline import paths, population, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=mlp", "tune.epochs=2", "tune.n_trials=6", "tune.startup_trials=0", "tune.population=4",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    fit_together, calls = population.fit_together, []

    def out_of_memory_once(runs, device, next_runs=None):
        if not calls:
            calls.append("oom")
            next_runs([], 0)  # the population fills up, then its first step fails
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fit_together(runs, device, next_runs)

    monkeypatch.setattr(population, "fit_together", out_of_memory_once)
    tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    study = tuning.open_search(cfg, paths.PREPARED_DIR).study
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 4 and all("out of memory" in t.user_attrs["fail_reason"] for t in failed)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 6
    assert "out of device memory with 4 trials at once: now at most 2" in capsys.readouterr().err


def batch_size_search(repo, n_trials: int, startup: int):
    """An untracked MLP search of batch size and lr, populations of 3, random sampler, storage in `repo`."""
    from pipeline.config import load_config

    space = {"train.batch_size": {"choices": [32, 64, 128]}, "train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    return load_config(REPO / "params.yaml", [
        "model.name=mlp", "tune.epochs=1", f"tune.n_trials={n_trials}", f"tune.startup_trials={startup}",
        "tune.population=3", "tune.sampler=random", f"tune.space={json.dumps(space)}",
        f"tune.storage={repo / 's.journal'}", "tracking.enabled=false", "train.device=cpu"])


@pytest.mark.parametrize("startup", [0, 3])
def test_a_population_shares_its_batch_size_and_the_next_one_draws_its_own(in_prepared_repo, startup):
    """Trials that train together share the searched params that fix tensor shapes (here the batch size), or they
    would be separate models taking turns; each tune.population trials in a row, the sampler draws them anew. The
    random startup trials draw their own: the sampler must see several values before it holds one."""
    from pipeline import paths, tuning

    cfg = batch_size_search(in_prepared_repo, n_trials=9, startup=startup)
    tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    trials = tuning.open_search(cfg, paths.PREPARED_DIR).study.trials
    sizes = [t.params["train.batch_size"] for t in trials]
    # a block starts with the trial that drew its shape: with startup trials, the last of them
    starts = (0, 3, 6) if startup == 0 else (2, 5, 8)
    blocks = [sizes[i:i + 3] for i in starts]
    assert all(len(set(block)) == 1 for block in blocks), sizes
    held = [t.number for t in trials if t.user_attrs.get("held_for_population") == ["train.batch_size"]]
    assert held == [n for n in range(starts[0], 9) if n not in starts]  # the trials say which values were held
    assert len({block[0] for block in blocks}) > 1, sizes  # drawn again: the search still explores it
    if startup:
        assert len(set(sizes[:startup])) > 1, sizes  # each startup trial drew its own


def test_a_trial_that_came_with_its_own_values_is_not_said_to_be_held(in_prepared_repo):
    """An enqueued trial (params.yaml's, a retry) keeps its own values whatever a population holds, and does not
    claim otherwise; it trains beside the population, a shape of its own."""
    from pipeline import paths, tuning

    cfg = batch_size_search(in_prepared_repo, n_trials=3, startup=0)
    search = tuning.open_search(cfg, paths.PREPARED_DIR)  # params.yaml's trial (batch 64) is enqueued first
    search.study.enqueue_trial({"train.batch_size": 128, "train.lr": 5e-3})  # as a retried trial is
    assert tuning.run_worker(search)
    trials = search.study.trials
    assert [t.params["train.batch_size"] for t in trials] == [64, 128, 64]
    assert [t.user_attrs.get("held_for_population") for t in trials] == [None, None, ["train.batch_size"]]


@pytest.mark.parametrize("why", ["cannot share a forward pass", "one member per fused call on this device"])
def test_trials_whose_models_cannot_be_fused_train_one_at_a_time(in_prepared_repo, monkeypatch, why):
    """A population of models that cannot share a forward pass (ResNets, pretrained backbones), or that this device
    would compute one member at a time (a CPU, large images), would only take turns with K models in memory: such
    trials run one after another whatever tune.population says, and each draws its own batch size (no forward
    pass to share)."""
    from pipeline import paths, tuning
    from pipeline.population import fusion
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=cnn", "tune.epochs=2", "tune.n_trials=4", "tune.startup_trials=0", "tune.population=4",
        "tune.sampler=random",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    if why == "cannot share a forward pass":
        monkeypatch.setattr(fusion, "signature", lambda model: None)  # as for a ResNet
    else:  # as for 28x28 images on this CPU (batch x 32 channels x 784 pixels > CPU_CONV_MEMBER_VALUES): any size
        monkeypatch.setattr(fusion, "CPU_CONV_MEMBER_VALUES", 0)
    tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    trials = tuning.open_search(cfg, paths.PREPARED_DIR).study.trials
    assert len(trials) == 4
    assert all(later.datetime_start >= earlier.datetime_complete for earlier, later in zip(trials, trials[1:]))
    assert len({trial.params["train.batch_size"] for trial in trials}) > 1


def test_a_trial_asked_by_a_process_stopped_before_naming_itself_is_failed_and_retried(in_prepared_repo):
    """SIGTERM between Optuna's ask and the owner's name left a RUNNING trial nobody would fail: the study waited
    forever for it. A running trial without an owner was asked by a stopped process (the lock is held meanwhile)."""
    from pipeline import paths, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=logreg", "tune.epochs=1", "tune.n_trials=2", "tune.timeout=30", "tune.population=1",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    search = tuning.open_search(cfg, paths.PREPARED_DIR)
    search.study.ask()  # what the stopped process left: the trial 0 of params.yaml, RUNNING, no owner
    assert tuning.run_worker(search), "the study did not complete"
    states = [t.state for t in search.study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2
    orphan, = [t for t in search.study.trials if t.state == TrialState.FAIL]
    assert orphan.user_attrs["fail_reason"] == "its process stopped before it started"


def test_a_trial_interrupted_between_its_ask_and_its_start_is_failed_with_the_population(in_prepared_repo,
                                                                                         monkeypatch):
    """Ctrl-C (or SIGTERM) while a joining trial samples its params: it is failed with the trials that were
    training, not left RUNNING for the next process to judge dead."""
    from pipeline import paths, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=logreg", "tune.epochs=1", "tune.n_trials=4", "tune.population=2", "tune.startup_trials=0",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"])
    from pipeline.tuning import trials

    search = tuning.open_search(cfg, paths.PREPARED_DIR)
    suggest = trials.suggest  # what a trial samples its params with

    def interrupted_at_the_third(trial, space):
        if trial.number == 2:
            raise KeyboardInterrupt
        return suggest(trial, space)

    monkeypatch.setattr(trials, "suggest", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        tuning.run_worker(search)
    third = search.study.trials[2]
    assert third.state == TrialState.FAIL and third.user_attrs["fail_reason"].startswith("stopped before it started")
    assert TrialState.RUNNING not in [t.state for t in search.study.trials] and not search.running


@pytest.mark.parametrize("completed, bars", [(3, False), (4, True)])
def test_importances_are_drawn_only_from_enough_completed_trials(tmp_path, monkeypatch, capsys, completed, bars):
    """Two searched params need at least four completed trials for fANOVA's bars; with fewer the plot says so
    (five of twenty-four completed in the default search, whose bars ranked noise, and differently from the
    dashboard's). Pruned trials have no final value and do not count."""
    import optuna

    from pipeline import paths
    from pipeline.config import load_config
    from pipeline.tuning.reports import write_reports

    cfg = load_config(REPO / "params.yaml", ["tune.space={train.lr: {low: 0.0001, high: 0.1, log: true}, "
                                             "model.dropout: {low: 0.0, high: 0.5}}"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for number in range(completed + 2):
        trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True),
                           "model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5)})
        if number < completed:
            study.tell(trial, trial.params["train.lr"] + trial.params["model.dropout"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    monkeypatch.chdir(tmp_path)
    write_reports(study, {"study": "s"}, cfg)
    assert (tmp_path / paths.TUNE_PLOTS / "param_importances.png").stat().st_size > 1000
    said = capsys.readouterr().err
    assert ("too few for importances (at least 4)" in said) is not bars, said


@pytest.mark.parametrize("space, lucky", [
    # a param the default scheduler never reads: every trial trains the untuned settings, any lead is luck
    ({"train.step_size": {"low": 1, "high": 50}}, True),
    # ten times the untuned lr really is better after 3 epochs, whatever the seed
    ({"train.lr": {"choices": [1.0e-3, 1.0e-2]}}, False)])
def test_a_search_ships_the_untuned_settings_unless_its_winner_beats_them_over_seeds(in_prepared_repo, space, lucky):
    from pipeline import paths, tuning
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", [
        "model.name=mlp", "tune.epochs=3", "tune.n_trials=6", "tune.startup_trials=2", "tune.warmup_epochs=1",
        f"tune.storage={in_prepared_repo / 'search.journal'}", "tracking.enabled=false", "train.device=cpu"]
    ).with_overrides({"tune.space": space})
    record = tuning.tune(cfg, paths.PREPARED_DIR, worker_args=[])
    confirmation = record["confirmation"]
    untuned, = [each for each in confirmation["candidates"] if each["untuned"]]
    assert confirmation["seeds"] == [42, 43, 44] and all(len(each["values"]) == 3 for each in confirmation["candidates"])
    assert json.loads(paths.BEST_PARAMS.read_text()) == json.loads(json.dumps(record))
    if lucky:
        assert confirmation["winner"] != untuned["trial"]  # a sampled trial leads by its seed alone...
        assert record["trial"] == untuned["trial"] and record["params"] == {"train.step_size": 10}  # ...and loses
        assert "does not beat the untuned settings" in confirmation["why"]
    else:
        assert record["params"] == {"train.lr": 1.0e-2} and confirmation["tuned_minus_untuned"]["high"] < 0
    study = optuna.load_study(study_name=record["study"], storage=tuning.open_storage(cfg.tune))
    assert study.user_attrs["confirm_shipped"] == record["trial"]
    assert study.user_attrs[f"confirm_trial_{untuned['trial']}"]["mean"] == untuned["mean"]
