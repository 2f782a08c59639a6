"""Batches by index, augmented whole on the device.

A resident split is sliced where it lives (airbench-style: on the training
device, no per-sample `__getitem__`, no collate, no worker processes). A
streamed split's batches are gathered from its memory-mapped file by a
DataLoader's workers while the device trains on the previous one. Both paths
draw the same order and the same augmentation from the same generator, and
augment whole batches on the device, so a seed gives the same run either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from pipeline.config import AugmentConfig
from pipeline.data import PreparedData, Split

EVAL_BATCH_SIZE = 1024  # no gradients kept, so evaluation can take big slices

class BatchTransform:
    """uint8 batch -> normalised float batch, with optional random crop/flip.

    Works on whole batches on the batch's device; its own generator makes the
    augmentation reproducible and checkpointable.
    """

    def __init__(self, mean: list[float], std: list[float], augment: AugmentConfig | None,
                 generator: torch.Generator | None = None, channels_last: bool = False):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # what it computes, when it draws nothing: transforms with the same can take each other's batches
        self.plain = None if augment is not None and any(value for _, value in augment) else \
            (tuple(mean), tuple(std), self.memory_format)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        augment, generator = self.augment, self.generator
        if augment is not None:
            if augment.crop_padding:
                images = random_crop(images, augment.crop_padding, generator)
            if augment.hflip:
                images = random_hflip(images, generator)
        x = images.float().div_(255)
        if augment is not None:
            if augment.rotation:
                x = random_rotation(x, augment.rotation, generator)
            if augment.brightness or augment.contrast or augment.saturation:
                x = color_jitter(x, augment.brightness, augment.contrast, augment.saturation, generator)
        if self.mean.device != x.device:  # once: a copy to a GPU every batch would wait for the host every step
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """RandomCrop(size, padding) for every image of a batch at once, via one gather."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]  # [n, 1, 1, w]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator | None) -> torch.Tensor:
    """RandomRotation(degrees) for a float batch: one angle per image, one affine grid_sample for all."""
    angle = (torch.rand(len(x), generator=generator, device=x.device) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation) for a float [0, 1] batch, one factor per image and kind."""

    def factor(strength: float) -> torch.Tensor:
        return 1 + (torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device) * 2 - 1) * strength

    def grey(batch: torch.Tensor) -> torch.Tensor:  # torchvision's rgb_to_grayscale weights
        if batch.shape[1] != 3:
            return batch
        weights = torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)
        return (batch * weights).sum(dim=1, keepdim=True)

    if brightness:
        x = (x * factor(brightness)).clamp_(0, 1)
    if contrast:
        mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(contrast) + mean).clamp_(0, 1)
    if saturation and x.shape[1] == 3:
        x = ((x - grey(x)) * factor(saturation) + grey(x)).clamp_(0, 1)
    return x


class TensorBatches:
    """Iterates (inputs, labels) batches of an in-memory Split by index."""

    def __init__(self, split: Split, batch_size: int, transform: BatchTransform, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)):
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator
        self.shard = shard  # (rank, ranks): this rank's slice of every batch

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        for index in self.positions(self.split.labels.device):
            yield self.rank_slice(self.transform(self.split.take(index)), self.split.labels[index])

    def positions(self, device: torch.device) -> list[torch.Tensor]:
        """This epoch's batches of positions, on `device`: one draw of the order from the generator."""
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator, device=self.generator.device) if self.shuffle \
            else torch.arange(n)
        return list(order.to(device, non_blocking=True)[:len(self) * self.batch_size].split(self.batch_size))

    def rank_slice(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a batch. The whole batch was augmented on every rank, so each drew what a single
        process would draw."""
        rank, ranks = self.shard
        if ranks > 1:
            return inputs.tensor_split(ranks)[rank], labels.tensor_split(ranks)[rank]
        return inputs, labels

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.split)


def together(runs: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Several runs' batches, step by step, stacked: (inputs [K, B, ...], labels [K, B]), what stacking each run's
    own batch gives (each draws its order and augmentation from its own generator).

    Runs that read the same resident split through the same transform that draws nothing (no augmentation) are
    read with one gather and transformed once per step, whatever K is: on a GPU, where a small model's step is
    launch-bound, a few kernels per step instead of a few per run. Others are read run by run."""
    first = runs[0]
    if all(type(each) is TensorBatches and each.split.images is first.split.images
           and each.split.labels is first.split.labels and each.batch_size == first.batch_size
           and each.shard == (0, 1) and each.transform.plain is not None
           and each.transform.plain == first.transform.plain for each in runs):
        orders = [each.positions(first.split.labels.device) for each in runs]  # each run's own draw
        for positions in map(torch.stack, zip(*orders)):
            images = first.transform(first.split.take(positions.flatten()))
            yield images.unflatten(0, positions.shape), first.split.labels[positions]
        return
    for batches in zip(*runs):
        yield torch.stack([inputs for inputs, _ in batches]), torch.stack([labels for _, labels in batches])


class StreamBatches(TensorBatches):
    """TensorBatches of a streamed split: a DataLoader's workers read each batch's images from the memory-mapped
    file (into pinned memory on CUDA) while the device trains; the batch is then copied without blocking and
    transformed on the device. Order and augmentation come from the same generator as TensorBatches', so a
    seed gives the same batches either way."""

    def __init__(self, split: Split, batch_size: int, transform: BatchTransform, device: torch.device,
                 workers: int, **options):
        super().__init__(split, batch_size, transform, **options)
        self.device, self.orders = device, _Orders()
        self.loader = torch.utils.data.DataLoader(
            _Rows(split), sampler=self.orders, batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            # its own generator for the workers' seeds: drawing them from the global RNG each epoch would shift
            # the dropout masks away from the resident path's
            generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        self.orders.chunks = self.positions(torch.device("cpu"))  # the workers read from the file on the host
        for images, labels in self.loader:
            yield self.rank_slice(self.transform(images.to(self.device, non_blocking=True)),
                                  labels.to(self.device, non_blocking=True))


class _Orders(torch.utils.data.Sampler):
    """The current epoch's batches of row positions (set by StreamBatches before each epoch)."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class _Rows(torch.utils.data.Dataset):
    """A batch of positions -> (uint8 images, labels): one read per batch, not one `__getitem__` per image."""

    def __init__(self, split: Split):
        self.split = split

    def __getitem__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.take(positions), self.split.labels[positions]


def split_batches(split: Split, batch_size: int, transform: BatchTransform, device: torch.device, workers: int = 0,
            **options) -> TensorBatches:
    """Batches of a split on `device`: resident (sliced where the data lives) or streamed (read from disk)."""
    if split.streamed:
        return StreamBatches(split, batch_size, transform, device, workers, **options)
    return TensorBatches(split.to(device), batch_size, transform, **options)


def training_batches(data: PreparedData, batch_size: int, augment: AugmentConfig, seed: int, device: torch.device,
                     drop_last: bool = False, channels_last: bool = False, shard: tuple[int, int] = (0, 1),
                     workers: int = 0) -> tuple[TensorBatches, TensorBatches]:
    """Shuffled, augmented train batches and plain val batches on `device` (`workers`: streamed data's readers).

    One seeded generator on the device drives both shuffling and augmentation,
    so a run is reproducible and its RNG fits in a checkpoint.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    train_transform = BatchTransform(data.mean, data.std, augment, generator, channels_last)
    train = split_batches(data.train, batch_size, train_transform, device, workers, shuffle=True, drop_last=drop_last,
                    generator=generator, shard=shard)
    return train, eval_batches(data.val, data.mean, data.std, device, channels_last, workers)


def eval_batches(split: Split, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool = False, workers: int = 0) -> TensorBatches:
    return split_batches(split, EVAL_BATCH_SIZE, BatchTransform(mean, std, None, channels_last=channels_last), device,
                   workers)
