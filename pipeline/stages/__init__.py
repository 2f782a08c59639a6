"""One module per DVC stage: a validated Config in, the stage's outputs out.

Each stage's code deps in dvc.yaml are its module (`pipeline/stages/train.py`),
this package's `__init__.py` and every pipeline module those import, so a change
to one stage's code re-runs that stage alone. `PARAMS` says which params each
stage reads; dvc.yaml lists exactly these. tests/test_dvc_yaml.py checks both,
and, running every stage, that its code reads no param it does not list.
Outputs hold no timings, run ids or other per-run noise: a deterministic re-run
rewrites the same bytes, so DVC and git see no change. Heavy modules are
imported inside the stage that needs them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, search_keys, training_keys
from pipeline.paths import FINAL

_DATA = ["data.name", "data.path", "data.follow_symlinks", "data.checksums"]
# what a run does between its steps: the range test sets each step's rate itself (keeping a pretrained backbone's
# ratio to train.lr) and runs no epochs
_NOT_IN_A_STEP = {"train.epochs", "train.scheduler", "train.step_size", "train.gamma",
                  "train.monitor", "train.monitor_window", "train.patience"}
PARAMS: dict[str, list[str]] = {
    "download": _DATA,
    "prepare": [*_DATA, "data.image_size", "data.channels", "data.skip_bad_images", "data.memory_limit_mb",
                "data.val_fraction", "data.test_fraction", "data.split_seed"],
    "train": [key for key in training_keys() if key != "model.name"],  # train@<model> sets the name
    # the range test of the model the search tunes: the model, how it trains a step, the sweep
    "lr_find": ["seed", "data.augment", "model", *(key for key in training_keys() if key.startswith("train.")
                                                   and key not in _NOT_IN_A_STEP), "lr_find"],
    # the study name holds data.name; CPU threads set the order of sums, which bf16 numbers show
    "tune": [*search_keys(), "data.name", "train.threads"],
    "train_final": training_keys(),
    # which runs are evaluated, how their reports are titled, where and with how many threads they compute, and
    # the seed of the intervals' bootstrap
    "evaluate": ["seed", "comparison", "data.name", "train.device", "train.threads"],
    # the seed of the paired comparisons' bootstrap
    "report": ["seed", "comparison", "data.name"],
}


def run_label(run_name: str, model_name: str) -> str:
    """How reports name a run: the final one says which model it is (as trained, whatever params say now)."""
    return f"{run_name} ({model_name})" if run_name == FINAL else run_name


def evaluated_runs(cfg: Config) -> list[str]:
    return [*cfg.comparison, FINAL]


def train_stage(output: Path) -> str:
    """The DVC stage that writes a training run's `output` (a file of models/<run>/ or reports/train/<run>/): what
    a message tells the user to run again."""
    run = output.parent.name
    return "train_final" if run == FINAL else f"train@{run}"
