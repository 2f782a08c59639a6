"""The acceptance path of a new user on a fresh clone, with the real `dvc` and MLflow/Optuna stores."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import browser, drawn_charts, run_cli, by_role, edit_params, git, run_dvc, stores
from pipeline.evaluation import KEYS

pytestmark = pytest.mark.slow

METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
               "f1_weighted"}
TINY = {"train.epochs": 2, "comparison": ["logreg"], "tune.n_trials": 3, "tune.epochs": 2, "tune.startup_trials": 1}


def test_fresh_clone_shows_everything_and_reruns_change_nothing(repo_copy, tmp_path):
    """The acceptance path of a new user: clone, `dvc repro`, look; `dvc repro -f`; an experiment on train.epochs."""
    # The publisher's own run needs no tracking (tracking.* is no stage's dep: DVC ignores it, the outputs are
    # the same); the published commit turns it on, as the user's clone has it.
    edit_params(repo_copy, {**TINY, "tracking.enabled": False})
    first = run_dvc("repro", cwd=repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    history = list(csv.DictReader((repo_copy / "reports/train/logreg/history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert list(history[0]) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    final = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert list(final)[:len(KEYS)] == list(KEYS) and METRIC_KEYS <= set(final)  # each with its 95% interval
    assert final["replicates"] == 3 and {f"{key}_{stat}" for key in METRIC_KEYS for stat in ("mean", "std")} <= set(final)
    # every model's test numbers are DVC metrics too (dvc metrics diff), keyed by model for short columns
    models = json.loads((repo_copy / "reports/models.json").read_text())
    assert set(models) == {"logreg", "final"} and models["final"]["accuracy"] == final["accuracy"]
    shown = json.loads(run_dvc("metrics", "show", "--json", cwd=repo_copy).stdout)
    assert shown[""]["data"]["reports/models.json"]["data"]["logreg"] == models["logreg"]
    compare = (repo_copy / "reports/compare.md").read_text()
    assert "| logreg |" in compare and "| final (cnn) |" in compare and "seconds" not in compare
    # the best model named, and every pair judged on the same images
    assert compare.count("Best: **") == 1 and "## Is A better than B?" in compare
    assert "| final (cnn) | logreg |" in compare or "| logreg | final (cnn) |" in compare
    # where the final model's params come from, and whether they beat the untuned settings beyond the seeds' noise
    confirmation = json.loads((repo_copy / "reports/tune/best_params.json").read_text())["confirmation"]
    assert f"Tuning, on validation over seeds 42, 43, 44: {confirmation['why']}; `final` trains with trial " \
           f"{confirmation['shipped']}'s params." in compare
    assert f"| {final['accuracy']:.4f} [{final['accuracy_ci95_low']:.3f}, {final['accuracy_ci95_high']:.3f}] |" \
        in compare
    assert (repo_copy / "reports/plots/confusion.png").stat().st_size > 1000
    # TensorBoard: each evaluated model's test confusion matrix and training curves, beside its runs' scalars
    for run_name in ("logreg", "final"):
        board = EventAccumulator(str(repo_copy / "runs/digits" / f"evaluate-{run_name}"), size_guidance={"images": 0})
        board.Reload()
        assert set(board.Tags()["images"]) == {"test/confusion_matrix", "train/curves"}, run_name
        assert board.Images("test/confusion_matrix")[0].width > 100
    assert not list((repo_copy / "checkpoints").rglob("*.pt")), "finished runs leave no resume point"
    edit_params(repo_copy, {"tracking.enabled": True})
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "published with its outputs")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_copy), str(clone)], check=True)

    # a fresh clone: outputs in git, no DVC cache, no stores; `make repro` as the README says (with this venv)
    repro = subprocess.run(["make", "-o", "install", "repro", f"VENV={Path(sys.executable).parent.parent}"],
                           cwd=clone, capture_output=True, text=True, timeout=600,
                           env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "Running stage 'tune'" in repro.stdout  # its plots live in the (missing) DVC cache
    # on a pipe: no epoch lines for runs this short, no libraries' chatter, no hint about a remote there is none of
    shown = repro.stdout + repro.stderr
    assert not re.search(r"epoch +\d+/", shown) and "INFO" not in shown and "dvc push" not in shown, shown
    assert "Created version" not in shown and len(shown.splitlines()) <= 60, shown
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
    # the confirmation: every candidate's params with each seed, nested under the study's run
    candidates = json.loads((clone / "reports/tune/best_params.json").read_text())["confirmation"]["candidates"]
    confirmed = roles["confirm"]
    assert {run.data.tags["mlflow.parentRunId"] for run in confirmed} == {study_run.info.run_id}
    assert sorted((int(run.data.tags["optuna.trial"]), int(run.data.tags["replicate.seed"])) for run in confirmed) \
        == sorted((each["trial"], seed) for each in candidates for seed in (42, 43, 44))
    assert {run.data.tags["pipeline.confirm"] for run in confirmed} == {"true"}
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

    # forced: the model trains from scratch (full curves), and git still sees no change
    forced = run_dvc("repro", "-f", "-s", "train@logreg", cwd=clone)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "resuming" not in forced.stderr
    assert git(clone, "status", "--porcelain").stdout == ""
    client, runs = stores(clone)
    assert len(by_role(runs)["logreg"]) == 2 * 4  # twice: the model's run and its three seed replicates'
    for run in by_role(runs)["logreg"]:
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
    # the committed final model against the experiment's, image by image, from the DVC cache
    compared = run_cli("compare", "HEAD", "three-epochs", "HEAD:logreg", cwd=clone)
    assert compared.returncode == 0, compared.stderr
    assert {"HEAD:final", "three-epochs:final", "HEAD:logreg"} <= set(compared.stdout.replace("|", " ").split())
    # the view a user compares experiments in: one row each within 120 columns, with a verdict against HEAD
    listed = run_cli("experiments", cwd=clone)
    assert listed.returncode == 0, listed.stderr
    assert max(len(line) for line in listed.stdout.splitlines()) <= 120, listed.stdout
    row, = [line for line in listed.stdout.splitlines() if line.startswith("three-epochs ")]
    accuracy = recorded["metrics"]["reports/metrics.json"]["data"]["accuracy"]
    assert "train.epochs=3" in row and f" {accuracy:.4f} [" in row, row
    assert re.search(r"  (better|worse|no sig\. diff \(±0\.\d{3}\))$", row), row

    shown = run_dvc("exp", "show", "--drop", "models.*", "--json", cwd=clone)
    assert shown.returncode == 0 and "ERROR" not in shown.stderr, shown.stderr

    # every Vega plot of plain `dvc plots show` drawn by a real browser with no network (this machine reaches no
    # CDN): make repro named the page with Vega inline in .dvc/config.local. DVC's own page draws none of them.
    shown = run_dvc("plots", "show", "-o", str(tmp_path / "dvc_plots"), cwd=clone)
    assert shown.returncode == 0 and "ERROR" not in shown.stderr, shown.stderr
    page = (tmp_path / "dvc_plots" / "index.html").read_text()
    charts = page.count("vegaEmbed('#")
    assert charts >= 4 and "cdn.jsdelivr.net" not in page
    assert drawn_charts(browser(), tmp_path / "dvc_plots" / "index.html") == charts
    # `plots REV...`: dvc plots diff on that page, whatever template a config names
    plots = run_cli("plots", "HEAD", "three-epochs", "-o", str(tmp_path / "offline"), cwd=clone)
    assert plots.returncode == 0, plots.stderr
    page = (tmp_path / "offline" / "index.html").read_text()
    assert page.count("vegaEmbed('#") >= charts and "cdn.jsdelivr.net" not in page and "three-epochs" in page
