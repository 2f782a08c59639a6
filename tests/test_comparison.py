"""Is A better than B? The paired comparisons behind compare.md: exact McNemar, Holm, a paired and seed-aware
bootstrap, and a verdict that a tie can never earn."""

import re

import numpy as np
import pytest

from pipeline import comparison
from pipeline.comparison import Predictions
from pipeline.errors import UserError

K, N = 10, 360


def predictions(name, right_fraction, seeds=(42,), shipped=0, data_md5="d" * 32, rng_seed=0, labels=None):
    """Predictions right on `right_fraction` of the images (one fraction per replicate, or one for all)."""
    rng = np.random.default_rng(rng_seed)
    labels = np.arange(N) % K if labels is None else labels
    fractions = right_fraction if isinstance(right_fraction, (list, tuple)) else [right_fraction] * len(seeds)
    probabilities = []
    for fraction in fractions:
        predicted = np.where(rng.random(N) < fraction, labels, (labels + 1 + rng.integers(K - 1, size=N)) % K)
        probabilities.append(np.eye(K, dtype=np.float32)[predicted])
    return Predictions(name, labels, np.stack(probabilities), np.array(seeds), shipped, data_md5,
                       tuple(str(c) for c in range(K)))


def test_mcnemar_p_is_statsmodels_exact_mcnemar():
    from statsmodels.stats.contingency_tables import mcnemar

    right_a = np.array([True] * 40 + [False] * 5 + [True] * 12 + [False] * 3)
    right_b = np.array([True] * 40 + [False] * 5 + [False] * 12 + [True] * 3)
    expected = mcnemar([[40, 12], [3, 5]], exact=True).pvalue  # rows: A right/wrong; columns: B right/wrong
    assert comparison.mcnemar_p(right_a, right_b) == pytest.approx(expected, rel=1e-12)
    assert comparison.mcnemar_p(right_b, right_a) == pytest.approx(expected, rel=1e-12)  # two-sided
    assert comparison.mcnemar_p(right_a, right_a) == 1.0


def test_a_model_against_itself_differs_by_exactly_zero_and_is_no_significant_difference():
    model = predictions("cnn", [0.97, 0.9, 0.95], seeds=(42, 43, 44))
    copy = Predictions("final", model.labels, model.probabilities, model.seeds, 0, model.data_md5, model.classes)
    [pair] = comparison.compare([model, copy], seed=42)
    assert pair.interval == {"accuracy": (0.0, 0.0), "f1_macro": (0.0, 0.0)}
    assert pair.difference == {"accuracy": 0.0, "f1_macro": 0.0}
    assert not pair.significant and pair.verdict.startswith("no significant difference")


def test_the_interval_holds_the_seeds_spread_not_only_the_shipped_models():
    """Two models whose shipped replicates are the same predictions but whose other seeds differ: the shipped
    models alone would say [0, 0]; over seeds the difference is uncertain."""
    a = predictions("a", [0.95, 0.80, 0.99], seeds=(42, 43, 44), rng_seed=1)
    b = Predictions("b", a.labels, np.stack([a.probabilities[0], *predictions("x", [0.99, 0.80], seeds=(43, 44),
                                                                              rng_seed=2).probabilities]),
                    a.seeds, 0, a.data_md5, a.classes)
    draws = comparison.paired_bootstrap(a, b, seed=7)
    low, high = np.percentile(draws["accuracy"], [2.5, 97.5])
    assert low < 0 < high


def test_a_clear_lead_is_better_a_two_image_lead_is_not_and_p_values_are_holm_corrected():
    strong = predictions("strong", 0.97, rng_seed=3)
    weak = predictions("weak", 0.60, rng_seed=4)
    # right on two more images than `strong`, wrong nowhere else
    predicted = strong.predicted[0].copy()
    wrong = np.flatnonzero(predicted != strong.labels)[:2]
    predicted[wrong] = strong.labels[wrong]
    close = Predictions("close", strong.labels, np.eye(K, dtype=np.float32)[predicted][None], strong.seeds, 0,
                        strong.data_md5, strong.classes)
    pairs = {(pair.better, pair.other): pair for pair in comparison.compare([strong, weak, close], seed=42)}

    assert pairs[("strong", "weak")].verdict == "strong better"
    near = pairs[("close", "strong")]
    assert near.difference["accuracy"] == pytest.approx(2 / N)
    assert not near.significant and near.p == 0.5  # 2 discordant images, both one way: 2 * 0.5**2
    assert "no significant difference (resolves ±" in near.verdict and near.resolvable > 0
    # Holm by hand: the smallest p times 3, the next times 2 (never below the one before), the largest times 1
    ordered = sorted(pairs.values(), key=lambda pair: pair.p)
    expected, floor = [], 0.0
    for rank, pair in enumerate(ordered):
        floor = max(floor, min(1.0, pair.p * (len(ordered) - rank)))
        expected.append(floor)
    assert [pair.p_holm for pair in ordered] == pytest.approx(expected)
    assert comparison.best_line([strong, weak, close], list(pairs.values())).startswith("Best: **close**")
    assert "its lead over strong is not significant" in comparison.best_line([strong, weak, close],
                                                                              list(pairs.values()))


def test_against_a_baseline_each_other_result_is_one_pair_holm_corrected_over_those_pairs_only():
    """`experiments`: each experiment against HEAD, never against each other; Holm counts the experiments."""
    base, better, same = predictions("base", 0.70, rng_seed=5), predictions("up", 0.95, rng_seed=6), \
        predictions("same", 0.70, rng_seed=5)
    pairs = comparison.compare([base, better, same], seed=42, baseline="base")
    assert [{pair.better, pair.other} for pair in pairs] == [{"base", "up"}, {"base", "same"}]
    up, tie = pairs
    assert up.better == "up" and up.significant and tie.interval["accuracy"] == (0.0, 0.0)
    assert up.p_holm == pytest.approx(min(1.0, 2 * up.p))  # the smaller p of two times 2


def test_predictions_made_on_different_test_sets_are_refused():
    ours = predictions("ours", 0.9)
    other_data = predictions("theirs", 0.9, data_md5="e" * 32)
    other_labels = predictions("shuffled", 0.9, labels=np.roll(np.arange(N) % K, 1))
    for theirs in (other_data, other_labels):
        with pytest.raises(UserError, match="different test sets"):
            comparison.compare([ours, theirs], seed=42)


def test_predictions_survive_their_file_byte_for_byte(tmp_path):
    ours = predictions("ours", [0.9, 0.8], seeds=(42, 43), shipped=1)
    ours.save(tmp_path / "a.npz")
    ours.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()  # no time stamp inside
    loaded = Predictions.load(tmp_path / "a.npz", "ours")
    assert loaded.shipped == 1 and loaded.data_md5 == ours.data_md5 and loaded.classes == ours.classes
    assert np.array_equal(loaded.probabilities, ours.probabilities) and np.array_equal(loaded.seeds, ours.seeds)


def test_the_compare_command_refuses_results_on_different_test_sets_in_one_line(tmp_path):
    from helpers import REPO, run_cli

    predictions("ours", 0.9).save(tmp_path / "ours.npz")
    predictions("theirs", 0.9, data_md5="e" * 32).save(tmp_path / "theirs.npz")
    result = run_cli("compare", str(tmp_path / "ours.npz"), str(tmp_path / "theirs.npz"), cwd=REPO)
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert "ours and theirs were tested on different test sets" in line
    same = run_cli("compare", str(tmp_path / "ours.npz"), str(tmp_path / "ours.npz"), cwd=REPO)
    assert same.returncode == 0 and "| ours [1] | ours [2] |" in same.stdout and "identical predictions" in same.stdout


def test_the_experiments_table_fits_120_columns_for_three_experiments_giving_up_only_changed_params():
    from pipeline.commands import EXPERIMENTS_HEADER
    from pipeline.reporting import text_table

    accuracy, delta = "0.9833 [0.969, 0.994]", "-0.0028 [-0.014, +0.008]"
    many = ", ".join(f"train.{key}={value}" for key, value in [("epochs", 30), ("lr", 0.0031622776601683794),
                                                                ("batch_size", 128), ("optimizer", "adamw"),
                                                                ("scheduler", "cosine"), ("label_smoothing", 0.1)])
    rows = [["baseline", "HEAD (2e9e6c6)", accuracy, "", ""],
            ["three-epochs", "train.epochs=3", accuracy, delta, "no sig. diff (±0.012)"],
            ["sober-mace", "model.name=mlp, train.lr=0.003", accuracy, delta, "worse"],
            ["long-search", many, accuracy, delta, "better"]]
    lines = text_table(EXPERIMENTS_HEADER, rows, 120, squeeze=1).splitlines()
    assert len(lines) == 5 and max(len(line) for line in lines) <= 120, "\n".join(lines)
    assert lines[4].startswith("long-search   train.epochs=30, train.lr=") and "…  0.9833 [" in lines[4]
    assert lines[2].endswith(f"{delta}  no sig. diff (±0.012)") and "train.epochs=3 " in lines[2]
    assert re.match(r"sober-mace +model\.name=mlp, train\.lr=0\.003 +0\.9833", lines[3])  # a fitting cell: whole
