"""TensorBoard's event files, read back with TensorBoard's own reader, against the run's history.csv."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import run_cli

pytestmark = pytest.mark.slow
SETTINGS = ["--set", "train.epochs=3", "--set", "replicates=2", "--set", "tracking.enabled=false"]


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_each_replicate_is_a_tensorboard_run_with_the_curves_of_its_history(prepared_repo):
    run_cli("train", "--model", "logreg", *SETTINGS, cwd=prepared_repo, check=True)
    folders = sorted((prepared_repo / "runs" / "digits").iterdir())  # runs/<experiment>/<MLflow run name>
    assert [folder.name.split("-")[:2] for folder in folders] == [["logreg", "seed42"], ["logreg", "seed43"]]
    history = list(csv.DictReader((prepared_repo / "reports/train/logreg/history.csv").open()))
    shipped = [each for each in map(events, folders)
               if [e.value for e in each.Scalars("val_loss")] == pytest.approx([float(r["val_loss"]) for r in history],
                                                                                 abs=1e-6)]
    assert len(shipped) == 1, "the shipped seed's TensorBoard run has its history's curves"
    board = shipped[0]
    for name in ("train_loss", "train_accuracy", "val_accuracy", "lr", "epoch_seconds"):
        assert [e.step for e in board.Scalars(name)] == [1, 2, 3], name
    assert board.Images("inputs") and "config/text_summary" in board.Tags()["tensors"]

    # the same config again: TensorBoard shows its epochs once, not the first run's as well
    run_cli("train", "--model", "logreg", *SETTINGS, cwd=prepared_repo, check=True)
    assert sorted((prepared_repo / "runs" / "digits").iterdir()) == folders
    assert [e.step for e in events(folders[0]).Scalars("val_loss")] == [1, 2, 3]


def test_tensorboard_off_writes_nothing(prepared_repo):
    run_cli("train", "--model", "logreg", *SETTINGS, "--set", "tracking.tensorboard=false", cwd=prepared_repo,
            check=True)
    assert not (prepared_repo / "runs").exists()
