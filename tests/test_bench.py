"""The benchmark's own arithmetic, which the README's population numbers rest on: forward passes counted as the
loop takes them, and a seeded row's ratio taken pair by pair."""

import dataclasses
import importlib.util
import sys

import pytest
import torch

from conftest import REPO, member
from pipeline import population
from pipeline.population import engine

CPU = torch.device("cpu")
_spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = sys.modules["bench"] = importlib.util.module_from_spec(_spec)  # its dataclasses look themselves up there
_spec.loader.exec_module(bench)


def test_a_fused_group_counts_one_pass_per_batch_and_each_trial_its_own_steps(digits, tiny_cfg):
    cfg = tiny_cfg.with_overrides({"model.name": "mlp", "train.epochs": 2})
    runs = [member(cfg.with_overrides(overrides), digits)
            for overrides in ({"train.lr": 1e-3}, {"train.lr": 2e-3}, {"train.lr": 3e-3}, {"train.batch_size": 32})]
    original = engine.train_one_epoch
    with bench.counting_passes() as counts:
        population.fit_together(runs, CPU)
    assert engine.train_one_epoch is original
    wide, narrow = len(runs[0].train_batches), len(runs[3].train_batches)  # batch 64 (three fused runs) and 32
    assert counts["passes"] == 2 * (wide + narrow)
    assert sorted(steps for _, steps in counts["trials"].values()) == sorted([2 * wide] * 3 + [2 * narrow])


def test_a_seeded_rows_ratio_pairs_each_search_with_its_own():
    # pairs 2x, 4x, 1.2x: their median is 2x; each side's median (4 s vs 12 s) would pair seed 1 with seed 2
    row = bench.Row("search", "ours", "reference", "s", [1.0, 4.0, 10.0], [2.0, 16.0, 12.0], paired=True)
    assert row.ratio == pytest.approx(2.0)
    assert dataclasses.replace(row, paired=False).ratio == pytest.approx(3.0)
