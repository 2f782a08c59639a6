"""Test-set metrics, all from scikit-learn (imported where used: `report` needs only the metric names)."""

from __future__ import annotations

import numpy as np

METRIC_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
               "precision_weighted", "recall_weighted", "f1_weighted")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy plus macro- and weighted-averaged precision, recall and F1."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    metrics = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        metrics |= {f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                    f"f1_{average}": float(f1)}
    return metrics


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
