import pytest
import torch

from pipeline import data
from pipeline.errors import UserError
from pipeline.config import AugmentConfig


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


def test_random_crop_returns_shifted_windows_of_the_padded_image():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    generator = torch.Generator().manual_seed(0)
    cropped = data.random_crop(images, padding=2, generator=generator)
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, y:y + 5, x:x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(cropped[n], window) for window in windows)


def test_hflip_flips_some_images_and_keeps_the_rest():
    images = torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8)
    out = data.random_hflip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) and not torch.equal(o, i) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_batches_cover_every_sample_once_per_epoch(digits):
    transform = data.BatchTransform(digits.mean, digits.std, None)
    batches = data.TensorBatches(digits.train, 100, transform, shuffle=True, generator=torch.Generator().manual_seed(1))
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == len(digits.train) and len(batches) == 13
    assert torch.equal(labels.sort().values, digits.train.labels.sort().values)
    dropped = data.TensorBatches(digits.train, 100, transform, drop_last=True)
    assert [len(y) for _, y in dropped] == [100] * 12


def test_batch_transform_normalises_to_train_statistics(digits):
    x, _ = next(iter(data.TensorBatches(digits.train, len(digits.train), data.BatchTransform(digits.mean, digits.std, None))))
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_augmented_batches_are_reproducible_from_the_generator_state(digits):
    def epoch(generator):
        augment = AugmentConfig(crop_padding=1, rotation=10, brightness=0.2, contrast=0.2)
        transform = data.BatchTransform(digits.mean, digits.std, augment, generator)
        return torch.cat([x for x, _ in data.TensorBatches(digits.train, 64, transform, shuffle=True, generator=generator)])

    assert torch.equal(epoch(torch.Generator().manual_seed(3)), epoch(torch.Generator().manual_seed(3)))


def test_rotation_by_zero_is_identity_and_by_ninety_turns_the_image():
    x = torch.rand(4, 1, 6, 6)
    assert torch.allclose(data.random_rotation(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-5)
    rotated = data.random_rotation(x, 90.0, torch.Generator().manual_seed(0))
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)


def test_color_jitter_stays_in_range_and_keeps_grey_images_grey():
    x = torch.rand(16, 3, 5, 5)
    out = data.color_jitter(x, 0.5, 0.5, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    grey = torch.rand(8, 1, 1, 1).expand(8, 3, 4, 4).clone()
    jittered = data.color_jitter(grey, 0.0, 0.0, 0.9, torch.Generator().manual_seed(0))
    assert torch.allclose(jittered, grey, atol=1e-6)  # saturation leaves no-colour images alone
    brighter = data.color_jitter(torch.full((64, 1, 2, 2), 0.5), 0.4, 0.0, 0.0, torch.Generator().manual_seed(1))
    factors = brighter[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6


@pytest.mark.parametrize("augmented, reads_per_step", [(False, 1), (True, 3)])
def test_runs_read_together_get_the_batches_each_reads_alone(digits, monkeypatch, augmented, reads_per_step):
    """`data.together` (a population's batches): each run's batch is the one it reads alone (its own order and
    augmentation, from its own generator). Runs with plain transforms are read in one gather per step; a run that
    augments reads its own."""
    cpu = torch.device("cpu")

    def runs():
        augments = [AugmentConfig(), AugmentConfig(crop_padding=1) if augmented else AugmentConfig(), AugmentConfig()]
        return [data.training_batches(digits, 32, augment, seed, cpu, channels_last=True)[0]
                for seed, augment in enumerate(augments)]

    alone = list(zip(*runs()))
    reads = []
    take = data.Split.take
    monkeypatch.setattr(data.Split, "take", lambda split, positions: reads.append(1) or take(split, positions))
    together = list(data.together(runs()))
    assert len(together) == len(alone) and len(reads) == reads_per_step * len(alone)
    for (inputs, labels), batches in zip(together, alone):
        assert torch.equal(inputs, torch.stack([each for each, _ in batches]))
        assert torch.equal(labels, torch.stack([each for _, each in batches]))


def test_seed_varies_training_only_the_split_has_its_own(repo_copy, monkeypatch):
    """A replicate, a trial or `-S seed=7` trains anew on the same test images: `prepare` splits by
    data.split_seed alone, so comparisons across seeds stay paired."""
    from helpers import REPO
    from pipeline import data, paths, stages
    from pipeline.config import load_config

    monkeypatch.chdir(repo_copy)
    prepared = {}
    for overrides in (["seed=42"], ["seed=7"], ["data.split_seed=7"]):
        stages.prepare(load_config(REPO / "params.yaml", overrides))
        prepared[overrides[0]] = data.load_prepared(paths.PREPARED_DIR).md5
    assert prepared["seed=42"] == prepared["seed=7"] != prepared["data.split_seed=7"]
