import pytest
import torch

from pipeline import data
from pipeline.errors import UserError


def test_digits_split_is_stratified_disjoint_and_complete(digits):
    sizes = {name: len(getattr(digits, name)) for name in data.SPLITS}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        counts = torch.bincount(split.labels, minlength=10).float()
        # every class holds its share (stratified): no class is under- or over-represented
        assert (counts / counts.sum() - 0.1).abs().max() < 0.02


def test_split_is_seeded(digits):
    from pipeline.datasets import digits as bundled
    from pipeline.config import DataConfig

    raw = bundled.load_digits()
    again = data.split_dataset(raw.train_images, raw.train_labels, raw.classes, DataConfig(), seed=42)
    assert torch.equal(again["val"].labels, digits.val.labels)
    other = data.split_dataset(raw.train_images, raw.train_labels, raw.classes, DataConfig(), seed=7)
    assert not torch.equal(other["val"].images, digits.val.images)


@pytest.mark.parametrize("per_class, fractions, message", [
    (1, {}, "class 'a' has 1 image(s) left to divide for data.test_fraction"),
    (4, {"test_fraction": 0.05}, "data.test_fraction=0.05 carves 1 of 12 images, but a stratified split needs "
                                 "at least 3"),
    (10, {"val_fraction": 0.01}, "data.val_fraction=0.01 carves 1 of 24 images"),
])
def test_splits_too_small_for_every_class_are_one_line_errors(per_class, fractions, message):
    from pipeline.config import DataConfig

    labels = torch.arange(3).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(UserError) as err:
        data.split_dataset(images, labels, ["a", "b", "c"], DataConfig(**fractions), seed=0)
    assert message in str(err.value)


def test_seed_varies_training_only_the_split_has_its_own(repo_copy, monkeypatch):
    """A replicate, a trial or `-S seed=7` trains anew on the same test images: `prepare` splits by
    data.split_seed alone, so comparisons across seeds stay paired."""
    from helpers import REPO
    from pipeline import data, paths
    from pipeline.config import load_config
    from pipeline.stages.prepare import prepare

    monkeypatch.chdir(repo_copy)
    prepared = {}
    for overrides in (["seed=42"], ["seed=7"], ["data.split_seed=7"]):
        prepare(load_config(REPO / "params.yaml", overrides))
        prepared[overrides[0]] = data.load_prepared(paths.PREPARED_DIR).md5
    assert prepared["seed=42"] == prepared["seed=7"] != prepared["data.split_seed=7"]
