"""Batches of a prepared split: order, augmentation and a population's batches read together."""

import pytest
import torch

from pipeline import batching, data
from pipeline.config import AugmentConfig


def test_random_crop_returns_shifted_windows_of_the_padded_image():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    generator = torch.Generator().manual_seed(0)
    cropped = batching.random_crop(images, padding=2, generator=generator)
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, y:y + 5, x:x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(cropped[n], window) for window in windows)


def test_hflip_flips_some_images_and_keeps_the_rest():
    images = torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8)
    out = batching.random_hflip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) and not torch.equal(o, i) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_batches_cover_every_sample_once_per_epoch(digits):
    transform = batching.BatchTransform(digits.mean, digits.std, None)
    batches = batching.TensorBatches(digits.train, 100, transform, shuffle=True,
                                     generator=torch.Generator().manual_seed(1))
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == len(digits.train) and len(batches) == 13
    assert torch.equal(labels.sort().values, digits.train.labels.sort().values)
    dropped = batching.TensorBatches(digits.train, 100, transform, drop_last=True)
    assert [len(y) for _, y in dropped] == [100] * 12


def test_batch_transform_normalises_to_train_statistics(digits):
    transform = batching.BatchTransform(digits.mean, digits.std, None)
    x, _ = next(iter(batching.TensorBatches(digits.train, len(digits.train), transform)))
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_augmented_batches_are_reproducible_from_the_generator_state(digits):
    def epoch(generator):
        augment = AugmentConfig(crop_padding=1, rotation=10, brightness=0.2, contrast=0.2)
        transform = batching.BatchTransform(digits.mean, digits.std, augment, generator)
        return torch.cat([x for x, _ in batching.TensorBatches(digits.train, 64, transform, shuffle=True,
                                                                generator=generator)])

    assert torch.equal(epoch(torch.Generator().manual_seed(3)), epoch(torch.Generator().manual_seed(3)))


def test_rotation_by_zero_is_identity_and_by_ninety_turns_the_image():
    x = torch.rand(4, 1, 6, 6)
    assert torch.allclose(batching.random_rotation(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-5)
    rotated = batching.random_rotation(x, 90.0, torch.Generator().manual_seed(0))
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)


def test_color_jitter_stays_in_range_and_keeps_grey_images_grey():
    x = torch.rand(16, 3, 5, 5)
    out = batching.color_jitter(x, 0.5, 0.5, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    grey = torch.rand(8, 1, 1, 1).expand(8, 3, 4, 4).clone()
    jittered = batching.color_jitter(grey, 0.0, 0.0, 0.9, torch.Generator().manual_seed(0))
    assert torch.allclose(jittered, grey, atol=1e-6)  # saturation leaves no-colour images alone
    brighter = batching.color_jitter(torch.full((64, 1, 2, 2), 0.5), 0.4, 0.0, 0.0, torch.Generator().manual_seed(1))
    factors = brighter[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6


@pytest.mark.parametrize("augmented, reads_per_step", [(False, 1), (True, 3)])
def test_runs_read_together_get_the_batches_each_reads_alone(digits, monkeypatch, augmented, reads_per_step):
    """`batching.together` (a population's batches): each run's batch is the one it reads alone (its own order and
    augmentation, from its own generator). Runs with plain transforms are read in one gather per step; a run that
    augments reads its own."""
    cpu = torch.device("cpu")

    def runs():
        augments = [AugmentConfig(), AugmentConfig(crop_padding=1) if augmented else AugmentConfig(), AugmentConfig()]
        return [batching.training_batches(digits, 32, augment, seed, cpu, channels_last=True)[0]
                for seed, augment in enumerate(augments)]

    alone = list(zip(*runs()))
    reads = []
    take = data.Split.take
    monkeypatch.setattr(data.Split, "take", lambda split, positions: reads.append(1) or take(split, positions))
    together = list(batching.together(runs()))
    assert len(together) == len(alone) and len(reads) == reads_per_step * len(alone)
    for (inputs, labels), batches in zip(together, alone):
        assert torch.equal(inputs, torch.stack([each for each, _ in batches]))
        assert torch.equal(labels, torch.stack([each for _, each in batches]))
