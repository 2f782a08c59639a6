"""Prepared data: every dataset decoded once (by `prepare`) into uint8 images [N, C, H, W] plus int64 labels,
split train/val/test.

What fits in `data.memory_limit_mb` is *resident*: one tensor, which training
moves to its device. What does not is *streamed*: the images stay in one file
on disk, memory-mapped (a DataLoader's workers and the OS page cache share it).
`batching` turns either into batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import files
from pipeline.config import DataConfig
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
