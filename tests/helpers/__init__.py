"""What the tests share besides fixtures: the repository, its throwaway copies, and the real entry points.

`conftest.py` holds the fixtures; a test imports these helpers from here (`from helpers import run_cli`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.config import Config

REPO = Path(__file__).resolve().parents[2]
# Everything a user's clone has that the pipeline needs to run.
REPO_FILES = ["pipeline", "dvc.yaml", "params.yaml", "pyproject.toml", "Makefile", ".dvc/config", ".dvc/.gitignore",
              ".dvc/plots", ".dvcignore", ".gitignore"]


def member(cfg: Config, prepared, callbacks=(), device: torch.device = torch.device("cpu")):
    """A run of the loop (`loop.Run`) for `cfg` on `prepared`: its seeded model and batches, as a trial's."""
    from pipeline import loop, training

    model, train_batches, val_batches = training.setup(cfg, prepared, device)
    return loop.Run(model, cfg.train, train_batches, val_batches, callbacks)


def run_cli(*args: str, cwd: Path, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in `cwd`, the way a DVC stage runs it."""
    env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def copy_repo(dest: Path) -> Path:
    """A fresh git+DVC repository holding this project's pipeline files."""
    for name in REPO_FILES:
        source = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "baseline")
    return dest


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True)


def run_dvc(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real `dvc` CLI, with this interpreter's bin first on PATH so stages find `python -m pipeline`."""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def edit_params(repo: Path, changes: dict) -> None:
    """Set dotted keys in repo/params.yaml, e.g. {"train.epochs": 2}."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_digit_folder(root, per_class=30):
    """Real handwritten digits (sklearn's) as PNG files in one sub-folder per class, mixed sizes and modes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if written.get(label, 0) == per_class:
            continue
        image = Image.fromarray((pixels * 255 / 16).astype("uint8"), "L").resize((16 + index % 3 * 8,) * 2)
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (image.convert("RGB") if index % 2 else image).save(folder / f"{index}.png")
        written[label] = written.get(label, 0) + 1
    return sum(written.values())


def stores(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return client, runs


def by_role(runs):
    roles = {}
    for run in runs:
        roles.setdefault(run.data.tags["pipeline.role"], []).append(run)
    return roles


def browser() -> str:
    """Debian's chromium (scripts/services.py install puts it there); the calling test is skipped without it, or
    fails where PIPELINE_REQUIRE_SERVICES is set (CI)."""
    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "chromium is not installed (python scripts/services.py install)"
        pytest.fail(message) if os.environ.get("PIPELINE_REQUIRE_SERVICES") else pytest.skip(message)
    return found


def drawn_charts(chromium: str, page: Path) -> int:
    """How many Vega charts a headless chromium draws on `page` (each a canvas or an SVG of marks)."""
    import re

    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    return len(re.findall(r'<canvas[^>]*>|<svg[^>]*class="marks"', dom))
