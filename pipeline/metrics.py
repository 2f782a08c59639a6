"""What the loop measures per epoch, and which direction is better: one schema for every consumer.

History files, MLflow metric names, console lines, the report's reader and the
pruner all take their names from `EpochMetrics`; nothing spells them again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

# Validation metrics a run or a search can select on, and which way is better.
DIRECTIONS = {"val_loss": "minimize", "val_accuracy": "maximize"}
Monitor = Literal["val_loss", "val_accuracy"]


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float  # wall clock
    samples_per_s: float  # wall clock


# Wall-clock values differ on every run: MLflow gets them, git-tracked files never do
# (they would make every deterministic re-run look like a change).
TIMING = ("epoch_seconds", "samples_per_s")
NAMES = tuple(f.name for f in fields(EpochMetrics))
CURVES = tuple(name for name in NAMES if name != "epoch" and name not in TIMING)  # what history.csv holds
HISTORY_COLUMNS = ("epoch", *CURVES)


def is_better(metric: str, value: float, than: float) -> bool:
    return value > than if DIRECTIONS[metric] == "maximize" else value < than


def worst(metric: str) -> float:
    return float("-inf") if DIRECTIONS[metric] == "maximize" else float("inf")


def history_row(m: EpochMetrics) -> list:
    return [m.epoch, *(round(getattr(m, name), 6) for name in CURVES)]


def from_history_row(row: dict[str, str]) -> EpochMetrics:
    """A row of history.csv back as EpochMetrics (timings, which the file does not hold, as 0)."""
    return EpochMetrics(**{name: (int(row[name]) if name == "epoch" else float(row[name])) for name in HISTORY_COLUMNS},
                        **dict.fromkeys(TIMING, 0.0))
