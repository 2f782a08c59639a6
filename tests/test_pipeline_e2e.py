"""The real entry points on tiny settings: `python -m pipeline ...` and `dvc repro` in a temporary repository."""

import csv
import json
import re
import subprocess
import time

import pytest

from conftest import edit_params, run_cli, run_dvc

pytestmark = pytest.mark.slow

TINY = {"train.epochs": 2, "models": ["logreg", "cnn"]}
METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
               "f1_weighted"}


def test_cli_stages_in_order(repo_copy):
    edit_params(repo_copy, TINY)
    run_cli("prepare", cwd=repo_copy, check=True)
    run_cli("train", "--model", "logreg", cwd=repo_copy, check=True)
    result = run_cli("train", "--model", "cnn", "--set", "train.epochs=1", cwd=repo_copy, check=True)
    assert "epoch   1/1" in result.stdout
    run_cli("train", "--final", cwd=repo_copy, check=True)
    run_cli("evaluate", cwd=repo_copy, check=True)
    run_cli("report", cwd=repo_copy, check=True)

    history = list(csv.DictReader((repo_copy / "reports/train/logreg/history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert set(history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert set(json.loads((repo_copy / "reports/metrics.json").read_text())) == METRIC_KEYS
    compare = (repo_copy / "reports/compare.md").read_text()
    assert "| logreg |" in compare and "| final (cnn) |" in compare
    assert (repo_copy / "reports/plots/confusion.png").stat().st_size > 1000


def test_train_without_prepared_data_is_a_one_line_error(repo_copy):
    result = run_cli("train", cwd=repo_copy)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: prepared data missing: data/prepared/tensors.pt "
                                     "(run `python -m pipeline prepare` or `dvc repro prepare`)")


def test_dvc_repro_end_to_end_then_up_to_date(repo_copy):
    edit_params(repo_copy, TINY)
    first = run_dvc("repro", cwd=repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("prepare", "train@logreg", "train@cnn", "train_final", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first.stdout

    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS and metrics["accuracy"] > 0.5
    assert (repo_copy / "models/final/model.pt").exists()
    confusion = list(csv.DictReader((repo_copy / "reports/plots/confusion.csv").open()))
    assert len(confusion) == 360 and set(confusion[0]) == {"actual", "predicted"}

    second = run_dvc("repro", cwd=repo_copy)
    assert second.returncode == 0 and "Data and pipelines are up to date." in second.stdout

    shown = run_dvc("metrics", "show", "--json", cwd=repo_copy)
    assert "reports/metrics.json" in shown.stdout
    plots = run_dvc("plots", "show", "-o", "plots_html", cwd=repo_copy)
    assert plots.returncode == 0 and "failed" not in plots.stderr + plots.stdout


def test_dvc_exp_run_records_changed_param_and_metrics(repo_copy):
    edit_params(repo_copy, {"train.epochs": 1, "models": ["logreg"]})
    result = run_dvc("exp", "run", "-S", "train.epochs=2", "-n", "two-epochs", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(run_dvc("exp", "show", "--json", cwd=repo_copy).stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    run = next(exp["revs"][0]["data"] for exp in experiments if exp.get("name") == "two-epochs")
    assert run["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "accuracy" in run["metrics"]["reports/metrics.json"]["data"]


def finished_runs(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, [r for r in client.search_runs(experiments) if r.info.status == "FINISHED"]


def test_dvc_repro_tracks_every_model_in_the_root_store(repo_copy):
    edit_params(repo_copy, TINY)
    result = run_dvc("repro", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    client, runs = finished_runs(repo_copy)
    roles = {r.data.tags["pipeline.role"] for r in runs}
    assert roles == {"logreg", "cnn", "final"}
    for run in runs:
        assert run.data.tags["dvc.stage"].startswith("train")
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
        assert "test_accuracy" in run.data.metrics
    assert client.search_model_versions("name = 'digits-cnn'")


def test_queued_experiments_share_the_root_store(repo_copy):
    edit_params(repo_copy, {"train.epochs": 1, "models": ["logreg"], "model.name": "logreg",
                            "tracking.log_models": False})
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qam", "tiny"], cwd=repo_copy,
                   check=True)
    for lr in ("0.01", "0.02"):
        queued = run_dvc("exp", "run", "--queue", "-S", f"train.lr={lr}", cwd=repo_copy)
        assert queued.returncode == 0, queued.stderr
    started = run_dvc("queue", "start", "-j", "2", cwd=repo_copy)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = run_dvc("queue", "status", cwd=repo_copy).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    run_dvc("queue", "stop", "--kill", cwd=repo_copy)
    assert status.count("Success") == 2, status
    _, runs = finished_runs(repo_copy)
    by_experiment = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert len(by_experiment - {None}) == 2, [r.data.tags for r in runs]
    assert {r.data.params["train.lr"] for r in runs} == {"0.01", "0.02"}
    assert not (repo_copy / ".dvc/tmp/exps").exists() or not list((repo_copy / ".dvc/tmp/exps").rglob("mlflow.db"))
