"""The real entry points on tiny settings: `python -m pipeline ...` and `dvc repro` in a temporary repository."""

import csv
import json
import re
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import edit_params, git, run_cli, run_dvc, write_digit_folder

pytestmark = pytest.mark.slow

TINY = {"train.epochs": 2, "comparison": ["logreg"], "tune.n_trials": 3, "tune.epochs": 2, "tune.startup_trials": 1}
UNTRACKED = {**TINY, "tracking.enabled": False}  # for tests about something else: MLflow costs ~3 s a process
METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
               "f1_weighted"}


def test_cli_stages_in_order(repo_copy):
    edit_params(repo_copy, UNTRACKED)
    run_cli("prepare", cwd=repo_copy, check=True)
    run_cli("train", "--model", "logreg", cwd=repo_copy, check=True)
    result = run_cli("train", "--model", "cnn", "--set", "train.epochs=1", cwd=repo_copy, check=True)
    assert "epoch   1/1" in result.stdout
    run_cli("train", "--final", "--set", "model.name=logreg", cwd=repo_copy, check=True)
    run_cli("evaluate", cwd=repo_copy, check=True)
    run_cli("report", cwd=repo_copy, check=True)

    history = list(csv.DictReader((repo_copy / "reports/train/logreg/history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert list(history[0]) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    assert set(json.loads((repo_copy / "reports/metrics.json").read_text())) == METRIC_KEYS
    compare = (repo_copy / "reports/compare.md").read_text()
    # the final model is named as it was trained (logreg), whatever params.yaml's model.name says
    assert "| logreg |" in compare and "| final (logreg) |" in compare and "seconds" not in compare
    assert (repo_copy / "reports/plots/confusion.png").stat().st_size > 1000
    assert not list((repo_copy / "checkpoints").rglob("*.pt")), "finished runs leave no resume point"


def test_train_without_prepared_data_is_a_one_line_error(repo_copy):
    result = run_cli("train", cwd=repo_copy)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: prepared data missing: data/prepared/tensors.pt "
                                     "(run `python -m pipeline prepare` or `dvc repro prepare`)")


def stores(repo):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return client, runs


def by_role(runs):
    roles = {}
    for run in runs:
        roles.setdefault(run.data.tags["pipeline.role"], []).append(run)
    return roles


def test_fresh_clone_shows_everything_and_reruns_change_nothing(repo_copy, tmp_path):
    """The acceptance path of a new user: clone, `dvc repro`, look; `dvc repro -f`; an experiment on train.epochs."""
    edit_params(repo_copy, TINY)
    first = run_dvc("repro", cwd=repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "published with its outputs")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_copy), str(clone)], check=True)

    # a fresh clone: outputs in git, no DVC cache, no stores
    repro = run_dvc("repro", cwd=clone)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "Running stage 'tune'" in repro.stdout  # its plots live in the (missing) DVC cache
    assert git(clone, "status", "--porcelain").stdout == "", git(clone, "diff", "HEAD").stdout

    storage = f"sqlite:///{clone / 'optuna.db'}"
    name, = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["val_loss"]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3 and finished[0].user_attrs.get("origin") == "params.yaml"
    client, runs = stores(clone)
    roles = by_role(runs)
    study_run, = roles["study"]
    for trial in finished:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["optuna.state"] == trial.state.name
    for run in roles["logreg"] + roles["final"]:
        assert run.info.status == "FINISHED" and run.data.tags["git.dirty"] == "false"
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
        assert {"test_accuracy", "best_val_loss"} <= set(run.data.metrics)
        # evaluation added test metrics without re-opening the run: its duration is its training
        assert run.info.end_time <= min(m.timestamp for m in client.get_metric_history(run.info.run_id,
                                                                                        "test_accuracy"))
    version, = client.search_model_versions("name = 'digits-cnn'")
    assert client.get_model_version_by_alias("digits-cnn", "best").version == version.version
    assert {"val_loss", "test_accuracy", "data.md5"} <= set(version.tags)

    # forced: every model trains from scratch (full curves), and git still sees no change
    forced = run_dvc("repro", "-f", "-s", "train@logreg", "train_final", cwd=clone)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "resuming" not in forced.stderr
    assert git(clone, "status", "--porcelain").stdout == ""
    client, runs = stores(clone)
    assert len(by_role(runs)["final"]) == 2
    for run in by_role(runs)["final"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]

    # another train.epochs re-trains the models, but not the search (tune.epochs fixes its epochs)
    experiment = run_dvc("exp", "run", "-S", "train.epochs=3", "-n", "three-epochs", cwd=clone)
    assert experiment.returncode == 0, experiment.stdout + experiment.stderr
    assert "Running stage 'train@logreg'" in experiment.stdout and "Running stage 'tune'" not in experiment.stdout
    shown = json.loads(run_dvc("exp", "show", "--json", cwd=clone).stdout)
    recorded = next(exp["revs"][0]["data"] for rev in shown for exp in (rev.get("experiments") or [])
                    if exp.get("name") == "three-epochs")
    assert recorded["params"]["params.yaml"]["data"]["train"]["epochs"] == 3
    assert "accuracy" in recorded["metrics"]["reports/metrics.json"]["data"]

    for command in (["exp", "show", "--drop", "models.*", "--json"], ["plots", "show", "-o", str(tmp_path / "p")]):
        shown = run_dvc(*command, cwd=clone)
        assert shown.returncode == 0 and "ERROR" not in shown.stderr, shown.stderr


def test_a_queued_experiment_logs_to_the_root_store(repo_copy):
    """DVC runs queued experiments in copies under .dvc/tmp/; their runs must land in the repo's store."""
    edit_params(repo_copy, {**TINY, "train.epochs": 1, "comparison": ["logreg"], "model.name": "logreg",
                            "tracking.log_models": False, "tune.n_trials": 1})
    git(repo_copy, "commit", "-qam", "tiny")
    queued = run_dvc("exp", "run", "--queue", "-S", "train.lr=0.02", cwd=repo_copy)
    assert queued.returncode == 0, queued.stderr
    started = run_dvc("queue", "start", cwd=repo_copy)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = run_dvc("queue", "status", cwd=repo_copy).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    run_dvc("queue", "stop", "--kill", cwd=repo_copy)
    assert status.count("Success") == 1, status
    _, runs = stores(repo_copy)
    runs = [r for r in runs if r.info.status == "FINISHED" and r.data.tags["pipeline.role"] in ("logreg", "final")]
    assert len(runs) == 2  # the experiment's comparison run and final run, in the repo's own store
    assert all(r.data.tags.get("dvc.exp_name") for r in runs), [r.data.tags for r in runs]
    assert {r.data.params["train.lr"] for r in runs} == {"0.02"}
    assert not (repo_copy / ".dvc/tmp/exps").exists() or not list((repo_copy / ".dvc/tmp/exps").rglob("mlflow.db"))


def test_folder_dataset_through_dvc_exp_run(repo_copy, tmp_path):
    images = tmp_path / "images"
    assert write_digit_folder(images) == 300
    edit_params(repo_copy, {**UNTRACKED, "train.epochs": 15, "comparison": ["logreg"], "model.name": "logreg"})
    git(repo_copy, "commit", "-qam", "tiny")
    result = run_dvc("exp", "run", "-S", "data.name=folder", "-S", f"data.path={images}", "-S", "data.channels=1",
                     "-S", "data.image_size=8", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["classes"] == [f"digit_{i}" for i in range(10)] and meta["shape"] == [1, 8, 8]
    assert sum(meta["sizes"].values()) == 300
    accuracy = json.loads((repo_copy / "reports/metrics.json").read_text())["accuracy"]
    assert accuracy > 0.6, f"test accuracy {accuracy} is not well above chance (0.1)"
