"""The learning-rate range test: its curve against torch-lr-finder's, and the `lr-find` command."""

import csv
import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader
from torch_lr_finder import LRFinder

from pipeline import loop, lr_finder, optim, training
from pipeline.errors import UserError

from helpers import run_cli

CPU = torch.device("cpu")


def test_the_curve_and_suggestion_are_torch_lr_finders(digits, tiny_cfg, monkeypatch):
    # what both compute alike: fp32, contiguous tensors, no dropout (torch-lr-finder's DataLoader iterator draws
    # from the global RNG that dropout uses)
    cfg = tiny_cfg.with_overrides({"train.precision": "fp32", "train.channels_last": False, "model.dropout": 0.0})
    model, train_batches, _ = training.setup(cfg, digits, CPU)
    batches = list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(train_batches)), 100))
    ours = lr_finder.range_test(loop.Run(model, cfg.train, batches, []), CPU, start_lr=1e-6, end_lr=10, steps=100)

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


@pytest.mark.slow
def test_lr_find_writes_its_curve_and_says_the_range_to_search(prepared_repo):
    result = run_cli("lr-find", "--model", "mlp", "--steps", "60", cwd=prepared_repo, check=True)
    out = prepared_repo / "reports/lr_find/mlp"
    reading = json.loads((out / "lr_find.json").read_text())
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    assert len(rows) == reading["steps"] <= 60 and (out / "lr_find.png").stat().st_size > 1000
    assert float(rows[0]["lr"]) == 1e-7 and reading["model"] == "mlp"
    low, high = reading["usable"]
    assert low < reading["steepest"] <= high and reading["steepest"] in [float(row["lr"]) for row in rows]
    assert f"tune.space.train.lr.low={low:.2e} -S tune.space.train.lr.high={high:.2e}" in result.stdout


def test_a_loss_that_is_nan_from_the_first_step_is_named_as_such(digits, tiny_cfg):
    model, train_batches, _ = training.setup(tiny_cfg, digits, CPU)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match="the loss is nan on the first batch, before any learning rate acted"):
        lr_finder.range_test(loop.Run(model, tiny_cfg.train, train_batches, []), CPU)
