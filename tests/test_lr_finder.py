"""The learning-rate range test: its curve against torch-lr-finder's, and the `lr-find` command."""

import csv
import itertools
import json
import math

import mlflow
import pytest
import torch
from optuna.distributions import FloatDistribution
from torch.utils.data import DataLoader
from torch_lr_finder import LRFinder

from pipeline import loop, lr_finder, optim, training
from pipeline.errors import UserError

from helpers import run_cli
from helpers.searches import load_only_study

CPU = torch.device("cpu")


def test_the_curve_and_suggestion_are_torch_lr_finders(digits, tiny_cfg, monkeypatch):
    # what both compute alike: fp32, contiguous tensors, no dropout (torch-lr-finder's DataLoader iterator draws
    # from the global RNG that dropout uses)
    cfg = tiny_cfg.with_overrides({"train.precision": "fp32", "train.channels_last": False, "model.dropout": 0.0})
    model, train_batches, _ = training.setup(cfg, digits, CPU)
    batches = list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(train_batches)), 100))
    ours = lr_finder.range_test(loop.Run(model, cfg.train, batches, []), CPU, min_lr=1e-6, max_lr=10, steps=100)

    theirs_model, _, _ = training.setup(cfg, digits, CPU)
    theirs = LRFinder(theirs_model, optim.build_optimizer(theirs_model.parameters(), cfg.train),
                      torch.nn.CrossEntropyLoss(), device="cpu")
    theirs.range_test(DataLoader(batches, batch_size=None), start_lr=1e-6, end_lr=10, num_iter=100)
    assert ours.stopped_early and ours.lrs == theirs.history["lr"] and ours.losses == theirs.history["loss"]
    monkeypatch.setattr("matplotlib.pyplot.show", lambda: None)
    _, suggested = theirs.plot(suggest_lr=True)
    assert ours.steepest() == suggested
    low, high = ours.usable()
    assert low == suggested / 10 and high == max(suggested, ours.minimum() / 10)


def test_the_range_test_leaves_no_trace_on_the_model_it_borrowed(digits, tiny_cfg):
    model, train_batches, _ = training.setup(tiny_cfg, digits, CPU)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    run = loop.Run(model, tiny_cfg.train, train_batches, [])
    lr_finder.range_test(run, CPU, steps=30)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert run.cfg is tiny_cfg.train


@pytest.mark.slow
def test_lr_find_writes_logs_and_sets_the_searched_range(search_repo, tracked_env):
    repo, storage = search_repo
    result = run_cli("lr-find", "--model", "mlp", "--set", "lr_find.steps=60", cwd=repo, env=tracked_env,
                     check=True)
    out = repo / "reports/lr_find/mlp"
    reading = json.loads((out / "suggestion.json").read_text())
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    assert len(rows) == reading["steps"] <= 60 and (out / "lr_find.png").stat().st_size > 1000
    assert float(rows[0]["lr"]) == 1e-7 and reading["model"] == "mlp"
    low, high = reading["usable"]
    assert low < reading["steepest"] <= high and reading["steepest"] in [float(row["lr"]) for row in rows]
    assert "dvc exp run -S tune.lr_from_finder=true" in result.stdout

    # the same curve and suggestion in MLflow, with the plot
    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    run, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.role` = 'lr_find'")
    assert run.info.run_name == "lr_find-mlp" and run.info.status == "FINISHED"
    logged = sorted(client.get_metric_history(run.info.run_id, "lr_find_loss"), key=lambda m: m.step)
    finite = [float(row["loss"]) for row in rows if math.isfinite(float(row["loss"]))]
    assert [m.value for m in logged] == finite and run.data.metrics["lr_suggestion"] == reading["steepest"]
    assert "lr_find/lr_find.png" in {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}

    # tune.lr_from_finder: the search's train.lr range is a decade either side of the suggestion
    result = run_cli("tune", "--set", "tune.lr_from_finder=true", "--set", "tune.n_trials=2", cwd=repo,
                     env=tracked_env)
    assert result.returncode == 0, result.stderr
    study = load_only_study(storage)
    searched = {t.distributions["train.lr"] for t in study.trials if t.user_attrs.get("origin") != "params.yaml"}
    assert searched == {FloatDistribution(reading["steepest"] / 10, reading["steepest"] * 10, log=True)}


def test_a_loss_that_is_nan_from_the_first_step_is_named_as_such(digits, tiny_cfg):
    model, train_batches, _ = training.setup(tiny_cfg, digits, CPU)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match="the loss is nan on the first batch, before any learning rate acted"):
        lr_finder.range_test(loop.Run(model, tiny_cfg.train, train_batches, []), CPU)
