"""Data-parallel training: `train --nproc 2` (torchrun, gloo on CPU) against one process on the same data."""

import csv
import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli

pytestmark = pytest.mark.slow

# dropout 0: each rank draws its own dropout masks, so only without dropout are the two runs the same computation
# one seed: under torchrun a model's replicates train one after another through the same loop, and these tests
# are about the ranks (and the runs' metrics, not their logged models)
SETTINGS = ["--set", "model.dropout=0", "--set", "data.augment.crop_padding=1", "--set", "train.epochs=3",
            "--set", "replicates=1", "--set", "tracking.log_models=false"]
EVERY_EPOCH = {"PIPELINE_LOG_SECONDS": "0"}  # the tests read epochs' lines
TOLERANCE = 1e-5  # float sums in another order (per rank, then across ranks); measured differences: ~1e-6


def history(repo):
    return list(csv.DictReader((repo / "reports/train/mlp/history.csv").open()))


def test_two_processes_train_like_one_with_the_same_global_batch(prepared_repo, tracked_env):
    single = run_cli("train", "--model", "mlp", *SETTINGS, cwd=prepared_repo, env=tracked_env, check=True)
    one = history(prepared_repo)
    double = run_cli("train", "--model", "mlp", "--nproc", "2", *SETTINGS, cwd=prepared_repo,
                     env={**tracked_env, **EVERY_EPOCH},
                     check=True)
    two = history(prepared_repo)
    assert [row["epoch"] for row in two] == ["1", "2", "3"]
    for a, b in zip(one, two):
        for key in a:
            assert abs(float(a[key]) - float(b[key])) <= TOLERANCE, (key, a[key], b[key])
    assert double.stdout.count("epoch   1/3") == 1, "every rank printed: only rank 0 should"
    assert "x 2 processes" in double.stdout and "x 2 processes" not in single.stdout

    client = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["distributed.world_size"] for r in runs) == ["1", "2"]


def test_two_processes_resume_after_sigterm(prepared_repo):
    settings = [*SETTINGS[:4], "--set", "replicates=1", "--set", "train.epochs=300", "--set", "train.patience=2",
                "--set", "train.scheduler=none", "--set", "tracking.enabled=false"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--model", "mlp", "--nproc", "2",
                                *settings], cwd=prepared_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **EVERY_EPOCH})
    for line in process.stdout:
        if "epoch   2/300" in line:
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert len(list((prepared_repo / "checkpoints/mlp").glob("*.pt"))) == 1, "rank 0 keeps one resume point"

    resumed = run_cli("train", "--model", "mlp", "--nproc", "2", *settings, cwd=prepared_repo, env=EVERY_EPOCH,
                      check=True)
    assert "resuming from" in resumed.stderr
    straight = run_cli("train", "--model", "mlp", *settings, "--set", "train.resume=false", cwd=prepared_repo,
                       check=True)
    assert "resuming" not in straight.stderr
    # the single-process run overwrote history.csv; compare its epochs with the resumed run's printed ones
    printed = [line.split("train_loss")[1].split()[0] for line in resumed.stdout.splitlines() if "train_loss" in line]
    expected = [row["train_loss"] for row in history(prepared_repo)]
    assert len(expected) >= 3 and [float(x) for x in printed] == pytest.approx(
        [float(x) for x in expected[-len(printed):]], abs=1e-3)
