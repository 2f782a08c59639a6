"""The real entry points on tiny settings: `python -m pipeline ...` and `dvc repro` in a temporary repository."""

import csv
import json
import re
import subprocess
import time

import pytest

from conftest import edit_params, run_cli, run_dvc

pytestmark = pytest.mark.slow

TINY = {"train.epochs": 2, "models": ["logreg", "cnn"], "tune.n_trials": 3, "tune.epochs": 2, "tune.startup_trials": 1}
UNTRACKED = {**TINY, "tracking.enabled": False}  # for tests about something else: MLflow costs ~3 s a process
METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
               "f1_weighted"}


def test_cli_stages_in_order(repo_copy):
    edit_params(repo_copy, UNTRACKED)
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

    # every run landed in the repo's own MLflow store
    client, runs = finished_runs(repo_copy)
    by_role = {}
    for run in runs:
        by_role.setdefault(run.data.tags["pipeline.role"], []).append(run)
    assert set(by_role) == {"logreg", "cnn", "final", "study", "trial"}
    study, = by_role["study"]
    assert len(by_role["trial"]) == 3
    assert all(t.data.tags["mlflow.parentRunId"] == study.info.run_id for t in by_role["trial"])
    for run in (r for role in ("logreg", "cnn", "final") for r in by_role[role]):
        assert run.data.tags["dvc.stage"].startswith("train")
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
        assert "test_accuracy" in run.data.metrics
    assert client.search_model_versions("name = 'digits-cnn'")


def test_dvc_exp_run_records_changed_param_and_metrics(repo_copy):
    edit_params(repo_copy, {**UNTRACKED, "train.epochs": 1, "models": ["logreg"]})
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


def test_queued_experiments_share_the_root_store(repo_copy):
    edit_params(repo_copy, {**TINY, "train.epochs": 1, "models": ["logreg"], "model.name": "logreg",
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
    runs = [r for r in runs if r.data.tags["pipeline.role"] in ("logreg", "final")]
    assert len(runs) == 4  # two experiments x (comparison run + final run)
    by_experiment = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert len(by_experiment - {None}) == 2, [r.data.tags for r in runs]
    assert {r.data.params["train.lr"] for r in runs if r.data.tags["pipeline.role"] == "logreg"} == {"0.01", "0.02"}
    assert not (repo_copy / ".dvc/tmp/exps").exists() or not list((repo_copy / ".dvc/tmp/exps").rglob("mlflow.db"))


def write_digit_folder(root, per_class=30):
    """Real handwritten digits (sklearn's) as PNG files in one sub-folder per class, mixed sizes and modes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if written.get(label, 0) == per_class:
            continue
        image = Image.fromarray((pixels * 255 / 16).astype("uint8"), "L").resize((16 + index % 3 * 8,) * 2)
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (image.convert("RGB") if index % 2 else image).save(folder / f"{index}.png")
        written[label] = written.get(label, 0) + 1
    return sum(written.values())


def test_folder_dataset_through_dvc_exp_run(repo_copy, tmp_path):
    images = tmp_path / "images"
    assert write_digit_folder(images) == 300
    edit_params(repo_copy, {**UNTRACKED, "train.epochs": 15, "models": ["logreg"]})
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qam", "tiny"], cwd=repo_copy,
                   check=True)
    result = run_dvc("exp", "run", "-S", "data.name=folder", "-S", f"data.path={images}", "-S", "data.channels=1",
                     "-S", "data.image_size=8", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["classes"] == [f"digit_{i}" for i in range(10)] and meta["shape"] == [1, 8, 8]
    assert sum(meta["sizes"].values()) == 300
    accuracy = json.loads((repo_copy / "reports/metrics.json").read_text())["accuracy"]
    assert accuracy > 0.6, f"test accuracy {accuracy} is not well above chance (0.1)"
