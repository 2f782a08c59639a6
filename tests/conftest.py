"""Shared fixtures: tiny configs, prepared digits, and throwaway copies of the repo.

Tests run the real entry points (`python -m pipeline`, `dvc repro`) on tiny
settings; GPU tests are skipped automatically where there is no CUDA device.
"""

from __future__ import annotations

import os

# One thread per process: the suite runs two test workers, each starting pipeline processes, on machines of two
# cores; more threads only oversubscribe them (10-50x slower epochs were measured that way).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
# Everything a user's clone has that the pipeline needs to run.
REPO_FILES = ["pipeline", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvc/plots", ".dvcignore",
              ".gitignore"]


# The longest modules first: `make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`, which hands out whole
# modules in collection order; a long module handed out last would leave the other worker idle for most of it
# (xdist's default order, most tests first, puts these one-test modules last).
LONGEST_FIRST = ["test_fresh_clone", "test_machines", "test_tuning_workers", "test_tracking", "test_resume",
                 "test_pipeline_e2e", "test_distributed", "test_tuning"]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.module.__name__)
               if item.module.__name__ in LONGEST_FIRST else len(LONGEST_FIRST))  # stable: file order otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(REPO / "params.yaml", ["train.epochs=3", "train.device=cpu"])


def member(cfg: Config, prepared, callbacks=(), device: torch.device = torch.device("cpu")):
    """A run of the loop (`loop.Run`) for `cfg` on `prepared`: its seeded model and batches, as a trial's."""
    from pipeline import loop, training

    model, train_batches, val_batches = training.setup(cfg, prepared, device)
    return loop.Run(model, cfg.train, train_batches, val_batches, callbacks)


@pytest.fixture(scope="session")
def digits():
    from pipeline import data
    from pipeline.datasets import digits as bundled

    cfg = load_config(REPO / "params.yaml")
    raw = bundled.load_digits()
    splits = data.split_dataset(raw.train_images, raw.train_labels, raw.classes, cfg.data, cfg.seed)
    mean, std = data.channel_stats(splits["train"])
    return data.PreparedData(**splits, classes=raw.classes, mean=mean, std=std, md5="digits-fixture")


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


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory) -> Path:
    """data/prepared of the default params (digits, seed 42), made once per test worker by the real CLI."""
    repo = copy_repo(tmp_path_factory.mktemp("template") / "repo")
    run_cli("prepare", cwd=repo, check=True)
    return repo / "data" / "prepared"


@pytest.fixture
def prepared_repo(repo_copy: Path, prepared_template: Path) -> Path:
    """A repo copy whose data is already prepared (a copy of the template: `prepare` costs a process start)."""
    shutil.copytree(prepared_template, repo_copy / "data" / "prepared")
    return repo_copy


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


@pytest.fixture
def search_repo(prepared_repo, tracked_env, tmp_path):
    """A prepared repo with a tiny search on its own SQLite storage; returns (repo, storage URL)."""
    from searches import TINY_SEARCH

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    edit_params(prepared_repo, {**TINY_SEARCH, "tune.storage": storage})
    return prepared_repo, storage


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """A real PostgreSQL and MLflow tracking server (scripts/services.py) for this test session.

    Skipped with one reason where PostgreSQL cannot be installed; where PIPELINE_REQUIRE_SERVICES is set (CI),
    that is a failure instead.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("services", REPO / "scripts" / "services.py")
    services = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services)
    directory = tmp_path_factory.mktemp("services")
    try:
        env = services.start(directory)
    except services.Unavailable as err:
        if os.environ.get("PIPELINE_REQUIRE_SERVICES"):
            pytest.fail(f"PostgreSQL/MLflow server required here (PIPELINE_REQUIRE_SERVICES): {err}")
        pytest.skip(f"no PostgreSQL on this machine: {err}")
    try:
        yield env
    finally:
        services.stop(directory)


@pytest.fixture(autouse=True)
def mlflow_uris_restored():
    """`tracking.connect` points MLflow's process-wide tracking and registry URIs at the store (what a stage process
    wants); a test that runs it in this process must not leave them to the next test of its worker, whose fluent
    `mlflow.search_runs` would read the wrong store."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI / the default
        mlflow.set_registry_uri(None)


@pytest.fixture
def tracked_env(tmp_path: Path, monkeypatch) -> dict:
    """MLFLOW_TRACKING_URI pointing at a real, empty SQLite store of this test (also for this process)."""
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {"MLFLOW_TRACKING_URI": uri}


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
