"""Is A better than B? Paired comparisons of models on the same test images, with a verdict.

Two models judged on the same images are compared image by image, which
separates far smaller differences than two independent intervals can:

- the difference in accuracy and macro F1, with a paired bootstrap interval:
  each resample draws the same test images for both sides and, where the
  models have seed replicates, a replicate of each (the same seed for both
  when they were trained with the same seeds), so the interval holds both the
  test set's and the training seed's variation;
- McNemar's exact test on the shipped models' discordant images (one right,
  the other wrong), its p-values Holm-corrected for the number of pairs;
- a verdict: "better" only when both agree (corrected p < 0.05 and an
  interval that excludes 0), else "no significant difference", with the
  smallest difference this test set could resolve (the interval's half-width).

Everything runs on the test predictions `evaluate` keeps (`Predictions`); two
sets of predictions made on different test sets are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.errors import UserError
from pipeline.evaluation import LEVEL, RESAMPLES, confusion_metrics

COMPARED = ("accuracy", "f1_macro")  # the metrics each pair's differences are given for
ALPHA = 1 - LEVEL
CHUNK = 250  # resamples per vectorised step: bounds memory on large test sets


@dataclass(frozen=True)
class Predictions:
    """A model's test-set predictions: every seed replicate's class probabilities, which one ships, and what test
    set they were made on (the prepared data's MD5)."""

    name: str
    labels: np.ndarray  # [n] true classes
    probabilities: np.ndarray  # [replicates, n, classes]
    seeds: np.ndarray  # [replicates]
    shipped: int  # index of the replicate that ships as the model
    data_md5: str
    classes: tuple[str, ...]

    @property
    def predicted(self) -> np.ndarray:
        """[replicates, n] predicted classes."""
        return self.probabilities.argmax(axis=2)

    def save(self, path: Path) -> None:
        files.write_npz(path, {"labels": self.labels, "probabilities": self.probabilities, "seeds": self.seeds,
                               "shipped": np.int64(self.shipped), "data_md5": np.str_(self.data_md5),
                               "classes": np.array(self.classes, dtype=np.str_)})

    def only(self, index: int, name: str) -> Predictions:
        """One replicate's predictions, as if it were the only one."""
        return Predictions(name, self.labels, self.probabilities[index:index + 1], self.seeds[index:index + 1], 0,
                           self.data_md5, self.classes)

    @classmethod
    def load(cls, path: Path, name: str, remedy: str = "") -> Predictions:
        arrays = files.read_npz(path, remedy)
        try:
            return cls(name, arrays["labels"], arrays["probabilities"], arrays["seeds"], int(arrays["shipped"]),
                       str(arrays["data_md5"]), tuple(str(c) for c in arrays["classes"]))
        except KeyError as err:
            raise UserError(f"{path} holds no {err} array: it is no predictions file this pipeline wrote; "
                            + (remedy or "run `dvc repro -f evaluate`")) from None


def same_test_set(compared: list[Predictions]) -> None:
    """Refuses, in one line, predictions made on different test sets: an image-by-image comparison of them is
    meaningless."""
    first = compared[0]
    for other in compared[1:]:
        if (other.data_md5, other.classes, other.labels.shape) != (first.data_md5, first.classes, first.labels.shape) \
                or not np.array_equal(other.labels, first.labels):
            raise UserError(f"{first.name} and {other.name} were tested on different test sets (prepared data "
                            f"{first.data_md5[:8]} vs {other.data_md5[:8]}): compare predictions made on the "
                            "same prepared data")


def mcnemar_p(right_a: np.ndarray, right_b: np.ndarray) -> float:
    """McNemar's exact test: two-sided binomial p of the images only one model got right (1 when there are none)."""
    from scipy.stats import binomtest

    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0


def paired_bootstrap(a: Predictions, b: Predictions, seed: int, resamples: int = RESAMPLES
                     ) -> dict[str, np.ndarray]:
    """Per COMPARED metric, `resamples` values of (a - b): each on one resample of the test images (the same for
    both), and one seed replicate of each side (the same index when both have the same seeds)."""
    rng = np.random.default_rng(seed)
    labels, k = a.labels, len(a.classes)
    n = len(labels)
    pred_a, pred_b = a.predicted, b.predicted
    pick_a = rng.integers(len(pred_a), size=resamples)
    paired_seeds = len(pred_a) == len(pred_b) and np.array_equal(a.seeds, b.seeds)
    pick_b = pick_a if paired_seeds else rng.integers(len(pred_b), size=resamples)
    present = np.zeros(k, dtype=bool)
    present[np.unique(np.concatenate([labels, pred_a.ravel(), pred_b.ravel()]))] = True
    out = {key: [] for key in COMPARED}
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=size)  # [size, n]: how often each image is drawn
        rows = np.arange(size)[:, None] * k * k + labels[None, :] * k
        sides = []
        for pred, pick in ((pred_a, pick_a), (pred_b, pick_b)):
            cells = (rows + pred[pick[start:start + size]]).ravel()
            matrices = np.bincount(cells, weights=weights.ravel(), minlength=size * k * k).reshape(size, k, k)
            sides.append(confusion_metrics(matrices, present))
        for key in COMPARED:
            out[key].append(sides[0][key] - sides[1][key])
    return {key: np.concatenate(values) for key, values in out.items()}


def mean_metrics(p: Predictions) -> dict[str, float]:
    """Each COMPARED metric's mean over the replicates (scikit-learn's values)."""
    from pipeline.evaluation import classification_metrics

    per_seed = [classification_metrics(p.labels, predicted) for predicted in p.predicted]
    return {key: float(np.mean([each[key] for each in per_seed])) for key in COMPARED}


@dataclass
class Pair:
    better: str  # the side with the higher mean accuracy: differences are better - other
    other: str
    difference: dict[str, float]
    interval: dict[str, tuple[float, float]]
    p: float  # McNemar's, of the shipped models
    p_holm: float = 1.0

    @property
    def significant(self) -> bool:
        low, _ = self.interval["accuracy"]
        return self.p_holm < ALPHA and low > 0

    @property
    def resolvable(self) -> float:
        """The smallest accuracy difference this comparison could tell from none: its interval's half-width."""
        low, high = self.interval["accuracy"]
        return (high - low) / 2

    @property
    def verdict(self) -> str:
        if self.significant:
            return f"{self.better} better"
        if self.interval["accuracy"] == (0.0, 0.0):
            return "no significant difference (identical predictions)"
        if self.p_holm < ALPHA:  # these two shipped models differ, but other seeds of the same recipes may not
            return f"no significant difference across seeds (resolves ±{self.resolvable:.3f}; the shipped models " \
                   "differ)"
        return f"no significant difference (resolves ±{self.resolvable:.3f})"


def compare(compared: list[Predictions], seed: int, resamples: int = RESAMPLES, baseline: str | None = None
            ) -> list[Pair]:
    """Every pair of `compared` (all on one test set), or with `baseline` (a name) each of the others against it;
    Holm-corrected over the pairs."""
    from statsmodels.stats.multitest import multipletests

    same_test_set(compared)
    means = {p.name: mean_metrics(p) for p in compared}
    pairs = []
    chosen = combinations(compared, 2) if baseline is None else \
        [(first, second) for first in compared if first.name == baseline for second in compared if second is not first]
    for first, second in chosen:
        a, b = (first, second) if means[first.name]["accuracy"] >= means[second.name]["accuracy"] else (second, first)
        draws = paired_bootstrap(a, b, seed, resamples)
        tail = ALPHA / 2 * 100
        right = [pred[p.shipped] == p.labels for p, pred in ((a, a.predicted), (b, b.predicted))]
        pairs.append(Pair(a.name, b.name, {key: means[a.name][key] - means[b.name][key] for key in COMPARED},
                          {key: tuple(float(v) for v in np.percentile(draws[key], [tail, 100 - tail]))
                           for key in COMPARED}, mcnemar_p(*right)))
    if pairs:
        for pair, adjusted in zip(pairs, multipletests([pair.p for pair in pairs], method="holm")[1]):
            pair.p_holm = float(adjusted)
    return pairs


TABLE_HEADER = ["A", "B", "Δ accuracy (A − B) [95% CI]", "Δ F1 macro [95% CI]", "McNemar p (Holm)", "verdict"]


def table_rows(pairs: list[Pair]) -> list[list[str]]:
    def shown(pair: Pair, key: str) -> str:
        low, high = pair.interval[key]
        return f"{pair.difference[key]:+.4f} [{low:+.3f}, {high:+.3f}]"

    return [[pair.better, pair.other, shown(pair, "accuracy"), shown(pair, "f1_macro"),
             f"{pair.p:.3g} ({pair.p_holm:.3g})", pair.verdict] for pair in pairs]


def best_line(compared: list[Predictions], pairs: list[Pair]) -> str:
    """Which model is best on mean test accuracy, and whether its lead over each other model is significant."""
    means = {p.name: mean_metrics(p)["accuracy"] for p in compared}
    best = max(means, key=means.get)
    seeds = len(next(p for p in compared if p.name == best).seeds)
    over = f" over {seeds} seeds" if seeds > 1 else ""
    beaten = [pair.other for pair in pairs if pair.better == best and pair.significant]
    level = f"{LEVEL:.0%}"
    if len(beaten) == len(compared) - 1:
        return f"Best: **{best}** (mean test accuracy {means[best]:.4f}{over}), significantly better than every " \
               f"other model ({level} level, Holm-corrected)."
    ties = [p.name for p in compared if p.name != best and p.name not in beaten]
    lead = f"significantly better than {', '.join(beaten)}; " if beaten else ""
    return f"Best: **{best}** (mean test accuracy {means[best]:.4f}{over}); {lead}its lead over " \
           f"{', '.join(ties)} is not significant ({level} level, Holm-corrected): this test set cannot rank them."
