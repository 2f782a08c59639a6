"""MLflow lineage against a real SQLite store in a temp dir (no mocks)."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import copy_repo, edit_params, run_cli

pytestmark = pytest.mark.slow

TEST_METRICS = {"test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro", "test_f1_weighted"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One repo copy with a tracked logreg comparison run and a tracked final logreg run, evaluated.

    Shared by the tests of this module (training is the slow part); none of them changes it for good.
    """
    root = tmp_path_factory.mktemp("trained")
    repo = copy_repo(root / "repo")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'store' / 'mlflow.db'}"}
    edit_params(repo, {"models": ["logreg"], "model.name": "logreg", "train.epochs": 3})
    for command in (["prepare"], ["train", "--model", "logreg"], ["train", "--final"], ["evaluate"]):
        run_cli(*command, cwd=repo, check=True, env=env)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {run.data.tags["pipeline.role"]: run
            for run in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    return repo, client, runs, env


def test_each_training_run_has_params_curves_test_metrics_lineage_and_model(trained):
    repo, client, runs, env = trained
    assert set(runs) == {"logreg", "final"}
    md5 = subprocess.run(["md5sum", "data/prepared/tensors.pt"], cwd=repo, capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for role, run in runs.items():
        assert run.info.status == "FINISHED"
        assert client.get_experiment(run.info.experiment_id).name == "digits"
        assert run.info.run_name.startswith("logreg-")
        assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"] == "logreg"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2, 3]
        assert TEST_METRICS <= set(run.data.metrics)
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit and tags["git.dirty"] == "true"  # params.yaml edited
        assert tags["data.md5"] == md5.split()[0]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"history.csv", "curves.png", "config.yaml", "confusion_matrix.png", "confusion_matrix.csv",
                "classification_report.txt", "classification_report.json"} <= artifacts
        assert client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    versions = client.search_model_versions("name = 'digits-logreg'")
    assert [v.run_id for v in versions] == [runs["final"].info.run_id]


def test_reproduce_matches_exactly_and_refuses_other_data(trained):
    repo, _, runs, tracked_env = trained
    run_id = runs["final"].info.run_id
    result = run_cli("reproduce", run_id, cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stderr
    assert f"run {run_id} reproduced exactly" in result.stdout
    assert "test_accuracy" in result.stdout

    run_cli("prepare", "--set", "seed=7", cwd=repo, check=True, env=tracked_env)
    result = run_cli("reproduce", run_id, cwd=repo, env=tracked_env)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert f"is not the data run {run_id} trained on" in line and "dvc checkout data/prepared" in line
    run_cli("prepare", cwd=repo, check=True, env=tracked_env)  # back to the data the runs trained on


def test_predict_from_local_model_and_registry(trained, tmp_path):
    repo, _, _, tracked_env = trained
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for index in (0, 1, 2):  # digits 0, 1, 2 as 32x32 RGB PNGs: converted back to 8x8 grey
        path = tmp_path / f"digit{index}.png"
        pixels = (digits.images[index] * 255 / 16).astype("uint8")
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).convert("RGB").save(path)
        paths.append(str(path))
    local = run_cli("predict", *paths, cwd=repo, env=tracked_env, check=True)
    registry = run_cli("predict", *paths, "--model", "models:/digits-logreg/1", cwd=repo, env=tracked_env, check=True)
    assert local.stdout == registry.stdout
    lines = local.stdout.strip().splitlines()
    assert len(lines) == 3 and all("top-3:" in line for line in lines)
    assert sum(line.split(": ")[1].split()[0] == str(i) for i, line in enumerate(lines)) >= 2

    missing = run_cli("predict", str(tmp_path / "nope.png"), cwd=repo, env=tracked_env)
    assert missing.returncode == 2 and "nope.png" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_diverging_run_is_failed_with_one_line(repo_copy, tracked_env):
    run_cli("prepare", cwd=repo_copy, check=True, env=tracked_env)
    result = run_cli("train", "--model", "mlp", "--set", "train.optimizer=sgd", "--set", "train.lr=1e12",
                     "--set", "train.epochs=3", cwd=repo_copy, env=tracked_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: training loss became")
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and "training loss became" in run.data.tags["error"]


def test_sigterm_ends_run_killed_and_training_resumes(repo_copy, tracked_env):
    run_cli("prepare", cwd=repo_copy, check=True, env=tracked_env)
    env = {**os.environ, **tracked_env}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--model", "cnn",
                                "--set", "train.epochs=300"], cwd=repo_copy, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Epoch 2's line means every callback of epoch 1 ran (and its checkpoint exists).
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if "epoch   2/300" in line or time.monotonic() > deadline:
            break
    assert (repo_copy / "checkpoints/cnn/last.pt").exists(), "no checkpoint written"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated" in stderr
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) >= 1

    resumed = run_cli("train", "--model", "cnn", "--set", "train.epochs=300", "--set", "train.patience=1",
                      cwd=repo_copy, env=tracked_env)
    # patience changes the config, so this must start fresh rather than resume a different run
    assert "resuming" not in resumed.stderr
