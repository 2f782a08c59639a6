"""Datasets larger than `data.memory_limit_mb`: decoded straight to a memory-mapped file and streamed through a
DataLoader, with the same batches (order, augmentation) as the resident path; folders that come split."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from helpers import edit_params, run_cli, write_digit_folder
from pipeline import batching, data, datasets
from pipeline.datasets import folders
from pipeline.config import load_config
from pipeline.errors import UserError

from helpers import REPO

SETTINGS = {"data.name": "folder", "data.channels": 1, "data.image_size": 8, "comparison": ["cnn"],
            "tracking.enabled": False, "train.epochs": 2, "model.dropout": 0.3,
            "data.augment.crop_padding": 1, "data.augment.rotation": 10.0}


@pytest.mark.slow
def test_a_streamed_folder_trains_exactly_like_the_resident_one(repo_copy, tmp_path):
    images = tmp_path / "images"
    write_digit_folder(images)
    other = tmp_path / "streamed"
    shutil.copytree(repo_copy, other)
    for repo, limit in ((repo_copy, 2048), (other, 0)):
        edit_params(repo, {**SETTINGS, "data.path": str(images), "data.memory_limit_mb": limit})
        prepared = run_cli("prepare", cwd=repo, check=True)
        assert ("streamed from disk" in prepared.stdout) == (limit == 0)
        run_cli("train", "--model", "cnn", cwd=repo, check=True)

    resident, streamed = (data.load_prepared(repo / "data" / "prepared") for repo in (repo_copy, other))
    assert streamed.train.streamed and not resident.train.streamed
    for name in data.SPLITS:
        split, view = getattr(resident, name), getattr(streamed, name)
        assert torch.equal(split.images, view.take(torch.arange(len(view))))
        assert torch.equal(split.labels, view.labels)
    # the same seed: the same per-epoch metrics (same order, augmentation and dropout), the same weights
    history = [list(csv.reader((repo / "reports/train/cnn/history.csv").open())) for repo in (repo_copy, other)]
    assert history[0] == history[1] and len(history[0]) == 3
    weights = [torch.load(repo / "models/cnn/model.pt", weights_only=True)["state_dict"] for repo in (repo_copy, other)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_streamed_batches_read_by_workers_equal_resident_ones(digits):
    """Evaluation and training batches, with DataLoader worker processes, against slices of the resident tensor."""
    everything = torch.cat([digits.train.images, digits.val.images])
    labels = torch.cat([digits.train.labels, digits.val.labels])
    rows = torch.randperm(len(everything), generator=torch.Generator().manual_seed(1))[:300]
    streamed = data.Split(everything, labels[rows], rows)
    resident = data.Split(everything[rows], labels[rows])
    cfg = load_config(REPO / "params.yaml", ["data.augment.crop_padding=2", "data.augment.hflip=true"])
    made = [batching.training_batches(data.PreparedData(split, split, split, digits.classes, digits.mean, digits.std),
                                  32, cfg.data.augment, 7, torch.device("cpu"), workers=workers)
            for split, workers in ((resident, 0), (streamed, 2))]
    for epoch in range(2):  # persistent workers, a new order each epoch
        for (x, y), (sx, sy) in zip(made[0][0], made[1][0], strict=True):
            assert torch.equal(x, sx) and torch.equal(y, sy)
    for (x, y), (sx, sy) in zip(made[0][1], made[1][1], strict=True):
        assert torch.equal(x, sx) and torch.equal(y, sy)


def split_folder(root, parts=("train", "valid", "test")):
    """A folder that comes split: train/, valid/ and test/ sub-folders, each with the class folders."""
    counts = {}
    for number, part in enumerate(parts):
        counts[part] = write_digit_folder(root / part, per_class=20 - 6 * number)
    return counts


def test_a_folder_that_comes_split_keeps_its_splits(tmp_path, monkeypatch):
    counts = split_folder(tmp_path / "images")
    monkeypatch.setattr(folders, "PARALLEL_FROM", 1)  # worker processes decode, in order
    raw = folders.load_folder(tmp_path / "images", channels=1, image_size=8, skip_bad_images=False)
    assert raw.classes == [f"digit_{i}" for i in range(10)]
    assert [len(raw.train_labels), len(raw.val_labels), len(raw.test_labels)] == list(counts.values())
    first = folders.load_image(tmp_path / "images" / "valid" / "digit_0" / sorted(
        path.name for path in (tmp_path / "images" / "valid" / "digit_0").iterdir())[0], 1, 8)
    assert torch.equal(raw.val_images[0], first)  # sorted like ImageFolder, within its own split

    monkeypatch.setattr(folders, "PARALLEL_FROM", 10 ** 9)
    sequential = folders.load_folder(tmp_path / "images", channels=1, image_size=8, skip_bad_images=False)
    assert torch.equal(sequential.train_images, raw.train_images) and torch.equal(sequential.test_images,
                                                                                  raw.test_images)


@pytest.mark.slow
def test_prepare_streams_a_split_folder_and_keeps_its_splits(repo_copy, tmp_path):
    counts = split_folder(tmp_path / "images")
    edit_params(repo_copy, {**SETTINGS, "data.path": str(tmp_path / "images"), "data.memory_limit_mb": 0})
    run_cli("prepare", cwd=repo_copy, check=True)
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["storage"] == "streamed" and meta["images"]["count"] == sum(counts.values())
    assert meta["sizes"] == {"train": counts["train"], "val": counts["valid"], "test": counts["test"]}


def test_split_folders_must_agree_on_their_classes(tmp_path):
    split_folder(tmp_path / "images", parts=("train", "val"))
    shutil.copytree(tmp_path / "images" / "val" / "digit_1", tmp_path / "images" / "val" / "digit_x")
    with pytest.raises(UserError, match=r"val/digit_x is a class that .*train does not have"):
        folders.scan_folder(tmp_path / "images")
    shutil.rmtree(tmp_path / "images" / "val" / "digit_x")
    shutil.copytree(tmp_path / "images" / "val", tmp_path / "images" / "validation")
    with pytest.raises(UserError, match="two val folders"):
        folders.scan_folder(tmp_path / "images")


def test_a_truncated_images_file_is_one_line_with_what_to_do(tmp_path, digits):
    out = tmp_path / "prepared"
    out.mkdir()
    everything = torch.cat([digits.train.images, digits.val.images, digits.test.images])
    (out / data.IMAGES_FILE).write_bytes(everything.numpy().tobytes())
    mapped = data.map_images(out / data.IMAGES_FILE, len(everything), list(everything.shape[1:]))
    rows = torch.arange(len(everything)).split([len(digits.train), len(digits.val), len(digits.test)])
    splits = {name: data.Split(mapped, getattr(digits, name).labels, index) for name, index in zip(data.SPLITS, rows)}
    data.save_prepared(out, splits, digits.classes, source="test")
    assert data.load_prepared(out).train.streamed

    with open(out / data.IMAGES_FILE, "r+b") as file:
        file.truncate(1000)
    with pytest.raises(UserError) as error:
        data.load_prepared(out)
    assert "\n" not in str(error.value) and "should hold" in str(error.value) and "dvc repro -f prepare" in str(
        error.value)


def test_a_dataset_with_an_official_test_split_streams_the_same_splits(tmp_path):
    """MNIST-like data (given test split, in memory when decoded): the streamed file holds train then test rows,
    and every split matches the resident one image for image."""
    generator = torch.Generator().manual_seed(0)
    train, test = (torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=generator) for n in (200, 50))
    raw = datasets.RawDataset(train, torch.arange(200) % 10, test, torch.arange(50) % 10,
                              [str(i) for i in range(10)])
    cfg = load_config(REPO / "params.yaml").data
    (tmp_path / data.IMAGES_FILE).write_bytes(torch.cat([train, test]).numpy().tobytes())

    resident = data.splits_of(raw, cfg, seed=3)
    streamed = data.splits_of(raw, cfg, seed=3, images_path=tmp_path / data.IMAGES_FILE)
    for name in data.SPLITS:
        view = streamed[name]
        assert view.streamed and torch.equal(view.take(torch.arange(len(view))), resident[name].images)
        assert torch.equal(view.labels, resident[name].labels)
    assert data.channel_stats(streamed["train"]) == data.channel_stats(resident["train"])
