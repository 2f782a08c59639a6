"""scikit-learn's bundled handwritten digits: the embedded default, nothing to download."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO

from pipeline.config import DataConfig
from pipeline.datasets import Listing, RawDataset, write_manifest


def fetch(cfg: DataConfig, root: Path, own: Path) -> str:
    """A manifest of what the data is (scikit-learn's version): nothing to fetch, and no torch to import."""
    return write_manifest(cfg, root, {"source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
                                      "scikit-learn": version("scikit-learn")})


def load(cfg: DataConfig, root: Path, out: BinaryIO | None = None, listing: Listing | None = None) -> RawDataset:
    return load_digits()


def load_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 [N, 1, 8, 8]; no official test split."""
    import torch
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    # 17 grey levels spread over 0..255 keeps them distinct and lets digits share the uint8 format.
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    return RawDataset(images, labels, None, None, [str(name) for name in digits.target_names],
                      source="sklearn.datasets.load_digits")
