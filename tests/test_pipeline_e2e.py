"""The real entry points on tiny settings: `python -m pipeline ...` and `dvc repro` in a temporary repository."""

import csv
import json

import pytest
import yaml

from conftest import run_cli, run_dvc

pytestmark = pytest.mark.slow

TINY = {"train": {"epochs": 2}, "models": ["logreg", "cnn"]}
METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
               "f1_weighted"}


def shrink_params(repo, changes=TINY):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_cli_stages_in_order(repo_copy):
    shrink_params(repo_copy)
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
    shrink_params(repo_copy)
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
    shrink_params(repo_copy, {"train": {"epochs": 1}, "models": ["logreg"]})
    result = run_dvc("exp", "run", "-S", "train.epochs=2", "-n", "two-epochs", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(run_dvc("exp", "show", "--json", cwd=repo_copy).stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    run = next(exp["revs"][0]["data"] for exp in experiments if exp.get("name") == "two-epochs")
    assert run["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "accuracy" in run["metrics"]["reports/metrics.json"]["data"]
