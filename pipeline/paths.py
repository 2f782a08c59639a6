"""Every file and folder the pipeline reads or writes, in one place.

Paths are relative to the repository root, where DVC runs every stage; dvc.yaml
spells the same paths (a test checks that the two agree). The tracking stores
are absolute: DVC points DVC_ROOT at the user's repository even inside the
copies under .dvc/tmp/ where queued experiments run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RAW_DIR = Path("data/raw")
# Users' own copies of a dataset's official files: no stage owns this folder, so no DVC command ever deletes or
# checks out over it (DVC empties a stage's output folder before the stage runs). Git-ignored.
OWN_COPIES_DIR = Path("data/local")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")
CHECKPOINTS_DIR = Path("checkpoints")  # resume points: git-ignored scratch, never a stage output

SAMPLES_PNG = REPORTS_DIR / "data" / "samples.png"
TUNE_DIR = REPORTS_DIR / "tune"
BEST_PARAMS = TUNE_DIR / "best_params.json"
TRIALS_CSV = TUNE_DIR / "trials.csv"
TUNE_PLOTS = TUNE_DIR / "plots"
METRICS_JSON = REPORTS_DIR / "metrics.json"
MODELS_JSON = REPORTS_DIR / "models.json"  # every model's test metrics, as DVC metrics (columns <model>.<metric>)
COMPARE_MD = REPORTS_DIR / "compare.md"
PLOTS_DIR = REPORTS_DIR / "plots"
DVC_DIR = Path(".dvc")
# DVC's plots page with Vega inline (`make repro` writes it and names it in .dvc/config.local). Git-ignored.
PLOTS_TEMPLATE = DVC_DIR / "offline-plots.html"

FINAL = "final"  # run name of the model `report` presents (model.name trained by `train --final`)


def raw_dir(dataset: str) -> Path:
    return RAW_DIR / dataset


def own_copies(dataset: str) -> Path:
    """Where a user keeps their copy of a dataset's files: in the repository the user works in, also when a
    queued or temporary experiment runs in a copy of it (see `project_root`)."""
    return project_root() / OWN_COPIES_DIR / dataset


def eval_dir(run_name: str) -> Path:
    return REPORTS_DIR / "eval" / run_name


def lr_find_dir(model: str) -> Path:
    """The range test of a model (the lr_find stage's outputs, for model.name): its curve, plot and suggestion."""
    return REPORTS_DIR / "lr_find" / model


LR_CURVE, LR_PLOT, LR_SUGGESTION = "lr_find.csv", "lr_find.png", "suggestion.json"  # in lr_find_dir


PREDICTIONS = "predictions.npz"  # in eval_dir: every replicate's test-set probabilities (`compare` reads them)
REPLICATES_JSON = "replicates.json"  # in eval_dir: each replicate's test metrics, their mean and std


@dataclass(frozen=True)
class RunPaths:
    """Where one training run's outputs go (`reproduce` points these at a scratch folder)."""

    model_dir: Path
    reports: Path
    checkpoints: Path

    @classmethod
    def of(cls, run_name: str, root: Path = Path(".")) -> RunPaths:
        return cls(root / MODELS_DIR / run_name, root / REPORTS_DIR / "train" / run_name,
                   root / CHECKPOINTS_DIR / run_name)

    @property
    def model(self) -> Path:
        return self.model_dir / "model.pt"

    def replicate_model(self, seed: int) -> Path:
        """One seed replicate's model (`model` is a copy of the one that ships)."""
        return self.model_dir / "replicates" / f"seed-{seed}.pt"

    def replicate_models(self) -> list[Path]:
        """The replicates' model files, by seed (none: the run had one seed)."""
        return sorted((self.model_dir / "replicates").glob("seed-*.pt"), key=lambda path: int(path.stem[5:]))

    @property
    def history(self) -> Path:
        return self.reports / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def curves(self) -> Path:
        return self.reports / "curves.png"


def project_root() -> Path:
    """The DVC repo the user works in; DVC points DVC_ROOT at it even inside queued-experiment copies."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_mlflow_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def default_mlflow_artifacts() -> Path:
    return project_root() / "mlartifacts"


def tensorboard_dir() -> Path:
    """TensorBoard's event files, one folder per run (`runs/`, as the PyTorch tutorials' SummaryWriter writes)."""
    return project_root() / "runs"


def ray_results_dir() -> Path:
    """Ray Tune's own record of its trials (tune.engine: ray); the study holds what the pipeline reads."""
    return project_root() / "ray_results"


def default_optuna_storage() -> str:
    return f"sqlite:///{project_root() / 'optuna.db'}"
