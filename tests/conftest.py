"""Shared fixtures: tiny configs, prepared digits, and throwaway copies of the repo (helpers: tests/helpers/).

Tests run the real entry points (`python -m pipeline`, `dvc repro`) on tiny
settings; GPU tests are skipped automatically where there is no CUDA device.
"""

from __future__ import annotations

import os

# One thread per process: the suite runs two test workers, each starting pipeline processes, on machines of two
# cores; more threads only oversubscribe them, and their threads mostly wait for each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, copy_repo, edit_params, run_cli
from pipeline.config import Config, load_config


# Every module that takes more than a few seconds, longest first (as `--durations` measures them): `make test` runs
# `-n 2 --dist loadscope --no-loadscope-reorder`, which hands out whole modules in this order to whichever worker
# is nearly done, so the other worker never waits long at the end for a long module handed out last. xdist's own
# order (most tests first) would put the one-test modules last; it knows no durations.
LONGEST_FIRST = ["test_fresh_clone", "test_tuning_workers", "test_tracking", "test_resume", "test_machines",
                 "test_tuning", "test_pipeline_e2e", "test_ray_tune", "test_bad_inputs", "test_distributed",
                 "test_streaming", "test_lr_finder", "test_datasets", "test_dvc_yaml", "test_board"]


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


@pytest.fixture(scope="session")
def digits():
    from pipeline import data
    from pipeline.datasets import digits as bundled

    cfg = load_config(REPO / "params.yaml")
    raw = bundled.load_digits()
    splits = data.split_dataset(raw.train_images, raw.train_labels, raw.classes, cfg.data, cfg.data.split_seed)
    mean, std = data.channel_stats(splits["train"])
    return data.PreparedData(**splits, classes=raw.classes, mean=mean, std=std, md5="digits-fixture")


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


@pytest.fixture
def search_repo(prepared_repo, tracked_env, tmp_path):
    """A prepared repo with a tiny search on its own SQLite storage; returns (repo, storage URL)."""
    from helpers.searches import TINY_SEARCH

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


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store whose schema MLflow itself made, once per test worker: a copy spares each test
    the migrations a new store runs (a fresh store's own creation: test_fresh_clone, test_tuning_workers)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("empty-store")
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
    return folder / "mlflow.db"


@pytest.fixture
def tracked_env(tmp_path: Path, monkeypatch, empty_mlflow_store: Path) -> dict:
    """MLFLOW_TRACKING_URI pointing at a real, empty SQLite store of this test (also for this process)."""
    (tmp_path / "store").mkdir()
    shutil.copy2(empty_mlflow_store, tmp_path / "store" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {"MLFLOW_TRACKING_URI": uri}


