"""Raw datasets decoded to uint8 tensors: one registry entry per kind, each kind one module.

`KINDS` names every dataset `data.name` can be (config.DatasetName lists the
same names; a test checks they are one list). A kind's module has the same two
functions: `fetch(cfg, root, own)`, what the `download` stage does (put the raw
files in `root`, or write a manifest of what the data is; returns a line to
print), and `load(cfg, root, out, listing)`, what `prepare` decodes. This file
imports none of them until one is asked for: the default `download` of the
bundled digits never imports torch.

- `digits`: scikit-learn's bundled handwritten digits;
- `official`: MNIST, Fashion-MNIST and CIFAR-10 from torchvision's files,
  verified against their official MD5s (local copies first, then mirrors);
- `folders`: an image folder (one sub-folder per class, optionally split);
- `downloads`: HTTP with retries, verified renames and safe archive extraction.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

    from pipeline.config import DataConfig

Listing = tuple[list[str], dict[str, dict[str, list[Path]]]]  # folders.scan_folder: (classes, {split: {class: files}})


@dataclass(frozen=True)
class RawDataset:
    train_images: torch.Tensor | None  # uint8 [N, C, H, W]; None: decoded straight into a file (streamed)
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor | None  # None: no official test split (or streamed: see test_labels)
    test_labels: torch.Tensor | None
    classes: list[str]
    source: str = ""  # where it came from, for meta.json
    val_images: torch.Tensor | None = None  # a folder that comes with its own val split
    val_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Kind:
    """One kind of dataset: the module that fetches and decodes it."""

    module: str  # pipeline.datasets.<module>
    folder: bool = False  # read from data.path and scanned before it is decoded (it may decode straight to disk)


KINDS = {
    "digits": Kind("digits"),  # scikit-learn's bundled 8x8 handwritten digits: works offline
    "mnist": Kind("official"),  # torchvision's files, checked against their official MD5s
    "fashion_mnist": Kind("official"),
    "cifar10": Kind("official"),
    "folder": Kind("folders", folder=True),  # an image folder at data.path, one sub-folder per class
}


def module(name: str) -> ModuleType:
    """The module of dataset kind `name` (imported now, not before)."""
    return importlib.import_module(f"pipeline.datasets.{KINDS[name].module}")


def fetch(cfg: DataConfig, root: Path, own: Path) -> str:
    """The `download` stage for `cfg.name`: raw files verified into `root` (a user's copies looked for in `own`
    first), or a manifest of what the data is; returns what it did, as one line."""
    return module(cfg.name).fetch(cfg, root, own)


def write_manifest(cfg: DataConfig, root: Path, manifest: dict) -> str:
    """`fetch` for a dataset with nothing to download: `root`/manifest.json says what the data is (DVC tracks it
    as the stage's output); returns what was done."""
    from pipeline import files

    files.write_json(root / "manifest.json", manifest)
    return f"{cfg.name}: nothing to download; manifest -> {root / 'manifest.json'}"


def load(cfg: DataConfig, root: Path, out: BinaryIO | None = None, listing: Listing | None = None) -> RawDataset:
    """Any supported dataset decoded to uint8 tensors: the one entry point `prepare` uses.

    `root` is where `download` put a dataset's raw files. With `out`, a
    folder's images are written there as they are decoded (train, val, test
    rows in that order) instead of being held in memory, and come back as None.
    `listing`: the folder's `folders.scan_folder`, when the caller already has it.
    """
    return module(cfg.name).load(cfg, root, out, listing)
