import numpy as np
import pytest

from pipeline.evaluation import METRIC_KEYS, classification_metrics, confusion, report


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    metrics = classification_metrics(y_true, y_pred)
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1/2, 2/3, 1; recall 1/2, 1, 1/2
    assert metrics["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [0.5, 0.8, 2 / 3]
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert metrics["f1_weighted"] == pytest.approx(sum(f1) / 3)  # equal support


def test_report_and_confusion_cover_absent_classes():
    text, as_dict = report(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])
    assert "c" in as_dict and as_dict["c"]["support"] == 0 and "accuracy" in text
    assert confusion(np.array([0, 1]), np.array([1, 1]), 3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]


def simulated_test_set(rng, classes: int, images: int, accuracy: float) -> np.ndarray:
    """A confusion matrix of `images` test images whose predictions are right with probability `accuracy`."""
    y_true = rng.integers(0, classes, images)
    wrong = rng.random(images) > accuracy
    y_pred = np.where(wrong, (y_true + rng.integers(1, classes, images)) % classes, y_true)
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)


def test_the_95_percent_intervals_cover_the_true_accuracy_95_percent_of_the_time():
    """1,000 test sets of 360 images (digits' test split) from a model with a known accuracy of 0.97: each
    interval covers 0.97 in 93-97% of them. A narrower one (say the 5th-95th percentile) covers ~90%."""
    from scipy.stats import binomtest

    from pipeline.evaluation import bootstrap_intervals

    rng = np.random.default_rng(0)
    bootstrap = wilson = 0
    for seed in range(1000):
        matrix = simulated_test_set(rng, 10, 360, 0.97)
        low, high = bootstrap_intervals(matrix, seed, resamples=1000)["accuracy"]
        bootstrap += low <= 0.97 <= high
        ci = binomtest(int(np.trace(matrix)), 360).proportion_ci(0.95, method="wilson")
        wilson += ci.low <= 0.97 <= ci.high
    assert 930 <= bootstrap <= 970 and 930 <= wilson <= 970, (bootstrap, wilson)


def test_the_bootstraps_arithmetic_is_scikit_learns():
    """On the observed matrix itself, the vectorised metrics the bootstrap computes are scikit-learn's, an absent
    class included (zero_division=0, averaged over the classes present)."""
    from pipeline.evaluation import confusion_metrics

    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 9, 300), rng.integers(0, 9, 300)  # class 9 of 10: never seen nor predicted
    y_pred[:150] = y_true[:150]
    matrix = confusion(y_true, y_pred, 10)
    mine = confusion_metrics(matrix[None], present=(matrix.sum(0) + matrix.sum(1)) > 0)
    for key, value in classification_metrics(y_true, y_pred).items():
        assert mine[key][0] == pytest.approx(value, abs=1e-12), key


def test_every_metric_gets_an_interval_around_it_the_same_for_the_same_seed():
    from pipeline.evaluation import KEYS, shown, with_intervals

    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 10, 360)
    y_pred = np.where(rng.random(360) < 0.95, y_true, rng.integers(0, 10, 360))
    matrix = confusion(y_true, y_pred, 10)
    metrics = with_intervals(classification_metrics(y_true, y_pred), matrix, seed=42)
    assert list(metrics) == list(KEYS) and metrics["images"] == 360
    for key in METRIC_KEYS:
        assert metrics[f"{key}_ci95_low"] <= metrics[key] <= metrics[f"{key}_ci95_high"], key
        assert metrics[f"{key}_ci95_high"] - metrics[f"{key}_ci95_low"] > 0.01, key  # 360 images cannot do better
    assert metrics["accuracy_wilson95_low"] <= metrics["accuracy"] <= metrics["accuracy_wilson95_high"]
    assert with_intervals(classification_metrics(y_true, y_pred), matrix, seed=42) == metrics
    assert with_intervals(classification_metrics(y_true, y_pred), matrix, seed=43) != metrics
    assert shown(metrics, "accuracy") == (f"{metrics['accuracy']:.4f} [{metrics['accuracy_ci95_low']:.3f}, "
                                          f"{metrics['accuracy_ci95_high']:.3f}]")
