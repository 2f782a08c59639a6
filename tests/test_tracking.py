"""MLflow lineage against a real SQLite store in a temp dir (no mocks)."""

import os
import pickle
import random
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import copy_repo, edit_params, run_cli

pytestmark = pytest.mark.slow

TEST_METRICS = {"test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro", "test_f1_weighted",
                "test_accuracy_ci95_low", "test_accuracy_ci95_high", "test_f1_macro_ci95_low", "test_images"}
# Every printable character a password may hold where SQLAlchemy reads one (an "@" percent-encoded, as the driver
# needs it), shuffled, between two distinctive ends: whatever part of it escaped the mask holds one of its
# 8-character windows (`leaks`).
_CHARACTERS = sorted(set(string.printable) - set("@\t\n\r\x0b\x0c")) + ["%40"]
random.Random(25).shuffle(_CHARACTERS)
PASSWORD = "Pa55w0rd" + "".join(_CHARACTERS) + "mustNOTleak"
SECRET_STORAGE = f"postgresql://optuna:{PASSWORD}@127.0.0.1:1/optuna"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_template):
    """One repo copy with a tracked logreg comparison run and two tracked final logreg runs, evaluated.

    params.yaml carries a storage URL with a password, and the final run gets another on its command line: both
    must be masked wherever they would show. Shared by the tests of this module (training is the slow part).
    """
    root = tmp_path_factory.mktemp("trained")
    repo = copy_repo(root / "repo")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'store' / 'mlflow.db'}"}
    (root / "store").mkdir()
    edit_params(repo, {"comparison": ["logreg"], "model.name": "logreg", "train.epochs": 3,
                       "tune.storage": SECRET_STORAGE})
    shutil.copytree(prepared_template, repo / "data" / "prepared")
    outputs = [run_cli(*command, cwd=repo, check=True, env=env) for command in (
        ["train", "--model", "logreg"],
        ["train", "--final", "--set", "tracking.uri='http://mlflow:%s@nowhere:5000'" % PASSWORD.replace("'", "''")],
        ["evaluate"])]
    # a second, worse final model (1 epoch) registers version 2; `best` must stay on version 1
    outputs.append(run_cli("train", "--final", "--set", "train.epochs=1", cwd=repo, check=True, env=env))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.level` = 'model'", order_by=["start_time ASC"])
    return repo, client, runs, env, outputs, root


def leaks(text: str | bytes) -> bool:
    """Whether any 8 consecutive characters of the password (or of its URL-encoded form) appear in `text`."""
    from urllib.parse import quote

    forms = (PASSWORD, quote(PASSWORD, safe=""))
    windows = [form[i:i + 8] for form in forms for i in range(len(form) - 7)]
    return any((w.encode() if isinstance(text, bytes) else w) in text for w in windows)


def replicates_of(client, run):
    return client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                              order_by=["params.seed ASC"])


def test_each_model_run_nests_its_seed_replicates_and_carries_their_spread(trained):
    """Every model trains with 3 seeds (the default): one MLflow run each, nested under the model's run, which
    ships the best on validation and carries each test metric's mean and std over them."""
    import statistics

    _, client, runs, _, _, _ = trained
    for run in runs[:2]:  # the evaluated ones
        replicates = replicates_of(client, run)
        assert [each.data.params["seed"] for each in replicates] == ["42", "43", "44"]
        assert {each.data.tags["pipeline.level"] for each in replicates} == {"replicate"}
        assert [len(client.get_metric_history(each.info.run_id, "val_loss")) for each in replicates] == [3, 3, 3]
        best = min(replicates, key=lambda each: each.data.metrics["best_val_loss"])
        assert run.data.tags["replicate.shipped_seed"] == best.data.params["seed"]
        assert run.data.metrics["test_accuracy"] == best.data.metrics["test_accuracy"]  # the shipped one's
        accuracies = [each.data.metrics["test_accuracy"] for each in replicates]
        assert run.data.metrics["test_accuracy_mean"] == pytest.approx(statistics.mean(accuracies))
        assert run.data.metrics["test_accuracy_std"] == pytest.approx(statistics.stdev(accuracies))


def test_each_training_run_has_params_curves_test_metrics_lineage_and_model(trained):
    repo, client, runs, env, _, _ = trained
    assert [r.data.tags["pipeline.role"] for r in runs] == ["logreg", "final", "final"]
    md5 = subprocess.run(["md5sum", "data/prepared/tensors.pt"], cwd=repo, capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for run in runs[:2]:
        assert run.info.status == "FINISHED"
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == "digits"
        # the UI opens it on its training runs, not on MLflow's GenAI overview; `ui` prints the link to them
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert run.info.run_name.startswith("logreg-")
        assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"] == "logreg"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2, 3]
        assert TEST_METRICS <= set(run.data.metrics) and "best_val_loss" in run.data.metrics
        assert not {"best_best_epoch", "best_params", "tracking_seconds"} & set(run.data.metrics)
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit and tags["git.dirty"] == "true"  # params.yaml edited
        assert tags["data.md5"] == md5.split()[0] and tags["model.parameters"] == "650"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"history.csv", "curves.png", "config.yaml", "confusion_matrix.png", "confusion_matrix.csv",
                "classification_report.txt", "classification_report.json"} <= artifacts
        assert client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    assert not (repo / "mlruns").exists(), "a logged model must land in the run's experiment, not ./mlruns"
    from pipeline.config import load_config
    from pipeline.tracking import ui

    cfg = load_config(repo / "params.yaml", [f"tracking.uri={env['MLFLOW_TRACKING_URI']}"])
    assert ui.runs_page(cfg, "http://127.0.0.1:5000", ["accuracy"]).startswith(
        f"http://127.0.0.1:5000/#/experiments/{runs[0].info.experiment_id}/runs?viewStateShareKey=")


def test_registry_versions_carry_val_and_test_metrics_and_best_is_chosen_on_validation(trained):
    _, client, runs, _, _, _ = trained
    first, second = client.search_model_versions("name = 'digits-logreg'", order_by=["version_number ASC"])
    assert (first.run_id, second.run_id) == (runs[1].info.run_id, runs[2].info.run_id)
    assert float(first.tags["val_loss"]) < float(second.tags["val_loss"])  # 3 epochs beat 1
    assert client.get_model_version_by_alias("digits-logreg", "best").version == first.version
    assert float(first.tags["test_accuracy"]) == runs[1].data.metrics["test_accuracy"]


def test_compare_judges_runs_and_a_seed_replicate_on_their_logged_predictions(trained):
    repo, client, runs, env, _, _ = trained
    logreg, final = runs[0], runs[1]
    seed_44 = replicates_of(client, final)[2]
    result = run_cli("compare", logreg.info.run_id, final.info.run_id, seed_44.info.run_id, "--markdown",
                     str(repo / "pairs.md"), cwd=repo, env=env)
    assert result.returncode == 0, result.stderr
    names = [logreg.info.run_name, final.info.run_name, f"{seed_44.info.run_name} (seed 44)"]
    assert result.stdout.startswith("Best: **") and all(name in result.stdout for name in names)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "verdict" not in line]
    assert len(rows) == 3  # three pairs
    assert (repo / "pairs.md").read_text().endswith(result.stdout)


def test_no_password_appears_in_any_field_file_or_message(trained):
    repo, client, runs, _, outputs, root = trained
    for run in [each for model in runs for each in [model, *replicates_of(client, model)]]:
        assert run.data.params["tune.storage"] == "postgresql://optuna:***@127.0.0.1:1/optuna"
        assert not leaks(str(run.data.params) + str(run.data.tags))
    assert "http://mlflow:***@nowhere:5000" in runs[1].data.tags["mlflow.source.name"]
    for result in outputs:
        assert not leaks(result.stdout + result.stderr)
    for folder in (root / "store", repo / "models", repo / "reports", repo / "mlartifacts"):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            assert not leaks(path.read_bytes()), path
    failed = run_cli("tune", "--set", "tune.n_trials=1", cwd=repo, env=trained[3])
    assert failed.returncode == 2 and not leaks(failed.stdout + failed.stderr)
    assert "optuna:***@127.0.0.1:1" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_reproduce_matches_exactly_and_refuses_other_data(trained):
    repo, client, runs, env, _, _ = trained
    # the model's run (its shipped replicate) and one of the seed replicates trained beside it
    for run_id in (runs[1].info.run_id, replicates_of(client, runs[1])[2].info.run_id):
        result = run_cli("reproduce", run_id, cwd=repo, env=env)
        assert result.returncode == 0, result.stderr
        assert f"run {run_id} reproduced exactly" in result.stdout and "test_accuracy" in result.stdout

    # within the seeds' spread, as on CUDA without deterministic kernels; and outside a spread made too narrow
    final = runs[1].info.run_id
    within = run_cli("reproduce", final, "--within-seeds", cwd=repo, env=env)
    assert within.returncode == 0 and f"run {final} reproduced within its seeds' spread" in within.stdout, within.stderr
    accuracy = runs[1].data.metrics["test_accuracy"]
    client.log_metric(final, "test_accuracy_mean", accuracy + 0.1)
    client.log_metric(final, "test_accuracy_std", 0.01)
    outside = run_cli("reproduce", final, "--within-seeds", cwd=repo, env=env)
    assert outside.returncode == 1
    assert outside.stderr.strip() == f"error: run {final} not reproduced: test_accuracy falls outside the seeds' spread"
    client.log_metric(final, "test_accuracy_mean", runs[1].data.metrics["test_accuracy_mean"])
    client.log_metric(final, "test_accuracy_std", runs[1].data.metrics["test_accuracy_std"])

    prepared = repo / "data" / "prepared"
    shutil.move(prepared, repo / "trained-on")
    try:
        run_cli("prepare", "--set", "data.split_seed=7", cwd=repo, check=True, env=env)
        result = run_cli("reproduce", run_id, cwd=repo, env=env)
        assert result.returncode == 2
        line, = result.stderr.strip().splitlines()
        assert f"is not the data run {run_id} trained on" in line and "dvc checkout data/prepared" in line
    finally:  # back to the data the runs trained on
        shutil.rmtree(prepared, ignore_errors=True)
        shutil.move(repo / "trained-on", prepared)


def digit_pngs(folder: Path) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for index in (0, 1, 2):  # digits 0, 1, 2 as 32x32 RGB PNGs: converted back to 8x8 grey
        path = folder / f"digit{index}.png"
        pixels = (digits.images[index] * 255 / 16).astype("uint8")
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).convert("RGB").save(path)
        paths.append(str(path))
    return paths


def test_predict_from_local_model_and_registry(trained, tmp_path):
    repo, _, _, env, _, _ = trained
    paths = digit_pngs(tmp_path)
    local = run_cli("predict", *paths, cwd=repo, env=env, check=True)
    registry = run_cli("predict", *paths, "--model", "models:/digits-logreg@best", cwd=repo, env=env, check=True)
    lines = registry.stdout.strip().splitlines()
    assert len(lines) == 3 and all("top-3:" in line for line in lines)
    assert sum(line.split(": ")[1].split()[0] == str(i) for i, line in enumerate(lines)) >= 2
    assert local.stdout != registry.stdout  # models/final is version 2 (1 epoch), @best is version 1

    missing = run_cli("predict", str(tmp_path / "nope.png"), cwd=repo, env=env)
    assert missing.returncode == 2 and "nope.png" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


class Payload:
    """Unpickling this runs a command: what an attacker would plant in a model's files."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_in_a_registered_model_never_runs(trained, tmp_path):
    repo, client, _, env, _, _ = trained
    version = client.get_model_version("digits-logreg", "1")
    store, = [mlmodel.parent for mlmodel in (repo / "mlartifacts" / "digits" / "models").glob("*/artifacts/MLmodel")
              if f"run_id: {version.run_id}" in mlmodel.read_text()]  # the registered model's files
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    (store / "python_model.pkl").write_bytes(evil)
    weights = next(store.glob("artifacts/*.pt"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(evil)  # a weights file that is really a pickle with a payload
        result = run_cli("predict", *digit_pngs(tmp_path), "--model", "models:/digits-logreg/1", cwd=repo, env=env)
        assert result.returncode == 2 and "cannot read model file" in result.stderr
        assert not marker.exists(), "unpickling a registered model ran the planted command"
    finally:
        weights.write_bytes(original)
        (store / "python_model.pkl").unlink()


def read_interrupted(db: Path) -> None:
    """Ctrl-C (or SIGTERM) in the middle of a store query: the statement is still open in the frames it unwinds."""
    import sqlite3

    connection = sqlite3.connect(db)
    rows = connection.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) "
                              "SELECT * FROM experiments, n")  # holds SQLite's read lock until it is finished
    rows.fetchone()
    raise KeyboardInterrupt


def test_a_run_interrupted_in_the_middle_of_a_store_query_is_closed_as_killed(tiny_cfg, tracked_env, tmp_path):
    from pipeline import tracking

    cfg = tiny_cfg.with_overrides({"tracking.enabled": True})
    run = tracking.TrackedRun(cfg, "interrupted", "test", "md5")
    run.closing_tags["why"] = "a test"
    with pytest.raises(KeyboardInterrupt):  # the interrupt itself, not "database is locked" from the cleanup
        with run:
            read_interrupted(tmp_path / "store" / "mlflow.db")
    closed = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"]).get_run(run.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["why"] == "a test"
