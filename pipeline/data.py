"""Datasets as compact uint8 tensors, batched by index.

Every dataset is decoded once (by `prepare`) into uint8 images [N, C, H, W]
plus int64 labels. What fits in `data.memory_limit_mb` is *resident*: training
slices batches out of one tensor that lives on the training device
(airbench-style): no per-sample `__getitem__`, no collate, no worker processes.
What does not is *streamed*: the images stay in one file on disk, memory-mapped
(workers and the OS page cache share it), and a DataLoader's workers gather
each batch while the device trains on the previous one. Both paths draw the
same order and the same augmentation from the same generator, and augment
whole batches on the device, so a seed gives the same run either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import files
from pipeline.config import AugmentConfig, DataConfig
from pipeline.errors import UserError, first_line

SPLITS = ("train", "val", "test")
IMAGES_FILE = "images.u8"  # a streamed dataset's images: raw uint8 [N, C, H, W], C order, no header


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]; streamed: all of the dataset's images, memory-mapped
    labels: torch.Tensor  # int64 [len(split)]
    index: torch.Tensor | None = None  # streamed: which rows of `images` are this split's, in order

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streamed(self) -> bool:
        return self.index is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The uint8 images at `positions` of this split (read from disk when streamed)."""
        return self.images[self.index[positions.cpu()]] if self.streamed else self.images[positions]

    def to(self, device: torch.device) -> Split:
        """On `device`; a streamed split stays on disk (its batches travel)."""
        if self.streamed:
            return self
        return Split(self.images.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


@dataclass(frozen=True)
class PreparedData:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]  # per channel, of train images scaled to [0, 1]
    std: list[float]
    md5: str = ""  # of tensors.pt: the data hash runs are tagged with and `reproduce` checks

    def to(self, device: torch.device) -> PreparedData:
        """All splits on `device` (a no-op copy where they already are)."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device),
                                   test=self.test.to(device))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------- prepare

def stratified_split(labels: torch.Tensor, fraction: float, seed: int, key: str, classes: list[str]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, carved) with `fraction` of every class carved out, seeded. `key` names the fraction's param."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(labels)
    present = counts[counts > 0]
    n, n_classes = len(labels), len(present)
    carved = math.ceil(fraction * n)
    if int(present.min()) < 2:
        smallest = int(torch.where(counts > 0, counts, n + 1).argmin())
        raise UserError(f"class {classes[smallest]!r} has {int(present.min())} image(s) left to divide for {key}: "
                        "a stratified split needs at least 2 per class at each split; add images")
    if carved < n_classes or n - carved < n_classes:
        raise UserError(f"{key}={fraction} carves {carved} of {n} images, but a stratified split needs at least "
                        f"{n_classes} (one per class) on each side: set {key} between {n_classes / n:.3f} and "
                        f"{1 - n_classes / n:.3f}, or add images")
    index = torch.arange(n).numpy()
    keep, carved_index = train_test_split(index, test_size=fraction, random_state=seed, stratify=labels.numpy())
    return torch.from_numpy(keep).sort().values, torch.from_numpy(carved_index).sort().values


def split_dataset(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cfg: DataConfig, seed: int,
                  test: Split | None = None, val: Split | None = None, streamed: bool = False) -> dict[str, Split]:
    """Seeded, stratified train/val(/test) split; a given (official or folder) test or val split is kept as given.

    `streamed`: `images` is the memory-mapped file of every image (given splits' rows included, by `index`), and
    the splits are views into it; otherwise each split's images are gathered into its own tensor.
    """
    def part(index: torch.Tensor) -> Split:
        return Split(images, labels[index], index) if streamed else Split(images[index], labels[index])

    rest = torch.arange(len(labels))
    if test is None:
        rest, test_index = stratified_split(labels, cfg.test_fraction, seed, "data.test_fraction", classes)
        test = part(test_index)
    if val is None:
        keep, val_index = stratified_split(labels[rest], cfg.val_fraction, seed, "data.val_fraction", classes)
        return {"train": part(rest[keep]), "val": part(rest[val_index]), "test": test}
    return {"train": part(rest), "val": val, "test": test}


def splits_of(raw, cfg: DataConfig, seed: int, images_path: Path | None = None) -> dict[str, Split]:
    """A decoded dataset's (datasets.RawDataset) train/val/test splits: resident tensors, or with `images_path`
    views of that file, which holds the train rows, then the given val and test rows."""
    given = {name: getattr(raw, f"{name}_labels") for name in SPLITS if getattr(raw, f"{name}_labels") is not None}
    if images_path is None:
        images = raw.train_images
        kept = {name: Split(getattr(raw, f"{name}_images"), given[name]) for name in ("val", "test") if name in given}
    else:
        shape = list(raw.train_images.shape[1:]) if raw.train_images is not None else \
            [cfg.channels, cfg.image_size, cfg.image_size]
        images = map_images(images_path, sum(map(len, given.values())), shape)
        rows = dict(zip(given, torch.arange(len(images)).split([len(labels) for labels in given.values()])))
        kept = {name: Split(images, given[name], rows[name]) for name in ("val", "test") if name in given}
    return split_dataset(images, raw.train_labels, raw.classes, cfg, seed, streamed=images_path is not None, **kept)


STATS_CHUNK = 4096  # images per step: statistics of a streamed split never hold it in memory


def channel_stats(split: Split) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the split's images scaled to [0, 1] (float64 sums over chunks)."""
    total = torch.zeros(split.image_shape[0], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(split), STATS_CHUNK):
        chunk = split.take(torch.arange(start, min(start + STATS_CHUNK, len(split)))).double().div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = len(split) * split.image_shape[1] * split.image_shape[2]
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def save_prepared(out_dir: Path, splits: dict[str, Split], classes: list[str], source: str,
                  images_path: Path | None = None) -> dict:
    """Write tensors.pt (all splits; streamed: their rows and labels, the images being in images.u8, written by
    the caller to `images_path`) and meta.json; returns the meta."""
    mean, std = channel_stats(splits["train"])
    streamed = splits["train"].streamed
    parts = ("index", "labels") if streamed else ("images", "labels")
    tensors = {f"{name}_{part}": getattr(split, part) for name, split in splits.items() for part in parts}
    files.save_torch(tensors, out_dir / "tensors.pt")
    meta = {"source": source, "classes": classes, "mean": mean, "std": std,
            "shape": list(splits["train"].image_shape),
            "sizes": {name: len(split) for name, split in splits.items()},
            "storage": "streamed" if streamed else "resident"}
    if streamed:
        meta["images"] = {"file": IMAGES_FILE, "count": len(splits["train"].images),
                          "md5": files.file_digest(images_path or out_dir / IMAGES_FILE)}
    else:
        (out_dir / IMAGES_FILE).unlink(missing_ok=True)  # a streamed run's images, no longer part of the data
    files.write_json(out_dir / "meta.json", meta)
    return meta


REPREPARE = "run `dvc repro -f prepare` (or `python -m pipeline prepare`) to write it again"


def load_prepared(data_dir: Path) -> PreparedData:
    tensors_path, meta_path = data_dir / "tensors.pt", data_dir / "meta.json"
    for path in (tensors_path, meta_path):
        if not path.exists():
            raise UserError(f"prepared data missing: {path} (run `python -m pipeline prepare` or `dvc repro prepare`)")
    meta = files.read_json(meta_path, REPREPARE)
    blob = files.read_bytes(tensors_path)  # read once: hashed and loaded from the same bytes
    try:
        tensors = torch.load(io.BytesIO(blob), weights_only=True)
        if meta.get("storage") == "streamed":
            images = map_images(data_dir / meta["images"]["file"], meta["images"]["count"], meta["shape"])
            splits = {name: Split(images, tensors[f"{name}_labels"], tensors[f"{name}_index"]) for name in SPLITS}
            # hashing a dataset larger than memory at every start would cost minutes: prepare hashed it once
            md5 = hashlib.md5(blob + meta["images"]["md5"].encode()).hexdigest()
        else:
            splits = {name: Split(tensors[f"{name}_images"], tensors[f"{name}_labels"]) for name in SPLITS}
            md5 = hashlib.md5(blob).hexdigest()
        prepared = PreparedData(**splits, classes=list(meta["classes"]), mean=list(meta["mean"]),
                                std=list(meta["std"]), md5=md5)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/foreign bytes, or a meta.json of another shape
        raise UserError(f"{data_dir} is corrupt ({first_line(err)}); {REPREPARE}") from None
    if not (len(prepared.mean) == len(prepared.std) == prepared.input_shape[0] and prepared.num_classes >= 2):
        raise UserError(f"{meta_path} does not match {tensors_path}; {REPREPARE}")
    return prepared


def map_images(path: Path, count: int, shape: list[int]) -> torch.Tensor:
    """The images file as a read-only, memory-mapped uint8 tensor [count, *shape] (pages load on first use)."""
    size = count * math.prod(shape)
    if not path.is_file() or path.stat().st_size != size:
        found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
        raise UserError(f"{path} should hold {size} bytes ({count} images), found {found}; {REPREPARE}")
    return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8).view(count, *shape)


# ---------------------------------------------------------------- batches

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


def batches(split: Split, batch_size: int, transform: BatchTransform, device: torch.device, workers: int = 0,
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
    train = batches(data.train, batch_size, train_transform, device, workers, shuffle=True, drop_last=drop_last,
                    generator=generator, shard=shard)
    return train, eval_batches(data.val, data.mean, data.std, device, channels_last, workers)


def eval_batches(split: Split, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool = False, workers: int = 0) -> TensorBatches:
    return batches(split, EVAL_BATCH_SIZE, BatchTransform(mean, std, None, channels_last=channels_last), device,
                   workers)
