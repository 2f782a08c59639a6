"""The benchmark's own arithmetic, which the README's population numbers rest on: forward passes counted as the
loop takes them, and a seeded row's ratio taken pair by pair."""

import dataclasses
import importlib.util
import sys

import pytest
import torch

from helpers import REPO, member
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


@pytest.mark.parametrize("pairs, verdict", [([2.0, 2.2, 2.1], "met"), ([1.4, 1.6, 1.55], "unresolved"),
                                            ([1.1, 1.3, 1.2], "MISSED")])
def test_a_target_is_judged_on_the_spread_of_the_pairs_not_on_one_median(pairs, verdict):
    # ours takes 1 s each time; the reference `ratio` times as long: each pair's ratio is one of `pairs`
    row = bench.Row("epoch", "ours", "reference", "s", [1.0] * len(pairs), pairs, target=1.5)
    assert row.spread == (min(pairs), max(pairs))
    assert row.verdict == verdict and row.met == (verdict == "met")


def test_the_performance_page_has_one_table_per_device_each_naming_its_machine():
    cpu = bench.device_results([bench.Row("epoch, cnn", "ours", "reference", "s", [1.0, 1.1], [2.0, 2.3],
                                          target=1.5, note="a note")], {}, "a 2-core CPU", "CPU")
    gpu = {**cpu, "device": "GPU: NVIDIA H200", "machine": "NVIDIA H200 (host: 16 cores)"}
    page = bench.render_page([gpu, cpu])
    assert [line for line in page.splitlines() if line.startswith("## ")] == ["## CPU", "## GPU: NVIDIA H200"]
    assert "a 2-core CPU; Python" in page and "NVIDIA H200 (host: 16 cores); Python" in page
    assert page.count("| epoch, cnn | ours | reference | s |") == 2 and "≥1.50: met" in page
