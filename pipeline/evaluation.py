"""Test-set metrics from scikit-learn, each with a 95% interval: how far another test set of this size could
move it (imported where used: `report` needs only the metric names).

The point values are scikit-learn's. The intervals resample the test images
(a seeded bootstrap): resampling n images with replacement is drawing n
(true, predicted) pairs from the confusion matrix's cells, so each resample is
one multinomial draw of a matrix, and every metric is computed on all of them
at once. Accuracy also gets Wilson's interval for a binomial proportion
(scipy.stats.binomtest), which needs no resampling.
"""

from __future__ import annotations

import numpy as np

METRIC_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
               "precision_weighted", "recall_weighted", "f1_weighted")
LEVEL = 0.95
RESAMPLES = 2000
BOUNDS = ("ci95_low", "ci95_high")  # metrics.json: <metric>_ci95_low / _high; MLflow: test_<metric>_ci95_low ...
WILSON = ("wilson95_low", "wilson95_high")  # accuracy only
# everything a run's metrics.json holds, in this order: the test images counted, each metric and its bounds
KEYS = ("images", *(name for key in METRIC_KEYS for name in (key, *(f"{key}_{bound}" for bound in BOUNDS))),
        *(f"accuracy_{bound}" for bound in WILSON))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy plus macro- and weighted-averaged precision, recall and F1."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    metrics = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        metrics |= {f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                    f"f1_{average}": float(f1)}
    return metrics


def with_intervals(metrics: dict[str, float], matrix: np.ndarray, seed: int) -> dict[str, float]:
    """`metrics` (of the test set behind confusion `matrix`) and, for each, the bounds of its seeded bootstrap
    interval; for accuracy also Wilson's; and how many test images there were (KEYS, in order). The same matrix
    and seed give the same numbers, to the last bit."""
    from scipy.stats import binomtest

    bounds = bootstrap_intervals(matrix, seed)
    wilson = binomtest(int(np.trace(matrix)), int(matrix.sum())).proportion_ci(LEVEL, method="wilson")
    values = {"images": int(matrix.sum()), **metrics,
              **{f"{key}_{bound}": value for key in METRIC_KEYS for bound, value in zip(BOUNDS, bounds[key])},
              f"accuracy_{WILSON[0]}": float(wilson.low), f"accuracy_{WILSON[1]}": float(wilson.high)}
    return {key: values[key] for key in KEYS}


def bootstrap_intervals(matrix: np.ndarray, seed: int, resamples: int = RESAMPLES) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval (LEVEL) of every metric, over `resamples` test sets of the same size drawn
    with replacement from the one behind confusion `matrix` (rows true, columns predicted)."""
    k, n = len(matrix), int(matrix.sum())
    drawn = np.random.default_rng(seed).multinomial(n, matrix.ravel() / n, size=resamples).reshape(-1, k, k)
    values = confusion_metrics(drawn, present=(matrix.sum(0) + matrix.sum(1)) > 0)
    tail = (1 - LEVEL) / 2 * 100
    return {key: tuple(float(bound) for bound in np.percentile(values[key], [tail, 100 - tail]))
            for key in METRIC_KEYS}


def confusion_metrics(matrices: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
    """METRIC_KEYS of confusion matrices [..., k, k], as scikit-learn computes them (zero_division=0, averaged
    over the `present` classes: those the original test set has or the model predicted)."""
    m = matrices.astype(np.float64)
    hits = np.diagonal(m, axis1=-2, axis2=-1)
    n = m.sum(axis=(-2, -1))
    tp, support, predicted = hits[..., present], m.sum(-1)[..., present], m.sum(-2)[..., present]

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape)), where=b > 0)

    weights = support / n[..., None]
    out = {"accuracy": hits.sum(-1) / n}
    for name, per_class in (("precision", ratio(tp, predicted)), ("recall", ratio(tp, support)),
                            ("f1", ratio(2 * tp, support + predicted))):
        out[f"{name}_macro"] = per_class.mean(-1)
        out[f"{name}_weighted"] = (per_class * weights).sum(-1)
    return out


def spread(per_seed: list[dict[str, float]], seeds: list[int], shipped_seed: int) -> dict:
    """Each metric's mean and sample standard deviation over a model's seed replicates (0 for one), and each
    replicate's value: what the training seed alone moves it by, on the same test images."""
    out: dict = {"replicates": len(seeds), "seeds": seeds, "shipped_seed": shipped_seed}
    for key in METRIC_KEYS:
        values = np.array([each[key] for each in per_seed])
        out |= {f"{key}_mean": float(values.mean()),
                f"{key}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out | {"per_seed": {key: [each[key] for each in per_seed] for key in METRIC_KEYS}}


def spread_metrics(spread: dict) -> dict[str, float]:
    """The means and standard deviations of `spread`, as flat metrics (<metric>_mean, <metric>_std)."""
    return {f"{key}_{stat}": spread[f"{key}_{stat}"] for key in METRIC_KEYS for stat in ("mean", "std")}


def shown_spread(spread: dict, key: str) -> str:
    """A metric's mean ± std over seeds, as tables show it: 0.9870 ± 0.0032."""
    return f"{spread[f'{key}_mean']:.4f} ± {spread[f'{key}_std']:.4f}"


def shown(metrics: dict[str, float], key: str) -> str:
    """A metric with its interval, as tables show it: 0.9889 [0.978, 0.997]."""
    low, high = (metrics[f"{key}_{bound}"] for bound in BOUNDS)
    return f"{metrics[key]:.4f} [{low:.3f}, {high:.3f}]"


def report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[str, dict]:
    """scikit-learn's classification report, as text and as a dict."""
    from sklearn.metrics import classification_report

    labels = list(range(len(classes)))
    kwargs = dict(labels=labels, target_names=classes, zero_division=0)
    return (classification_report(y_true, y_pred, digits=4, **kwargs),
            classification_report(y_true, y_pred, output_dict=True, **kwargs))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
