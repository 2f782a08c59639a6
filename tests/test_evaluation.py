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
