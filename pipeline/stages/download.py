"""`download`: raw files -> data/raw/<name>/ (torchvision's, MD5-verified), or a manifest of a bundled or local
dataset."""

from __future__ import annotations

from pipeline import paths
from pipeline.config import Config


def download(cfg: Config) -> None:
    """Fetch raw files (torchvision datasets, MD5-verified) or record what a bundled/local dataset holds."""
    from pipeline import datasets  # the registry alone: the bundled digits' download imports no torch

    print(datasets.fetch(cfg.data, paths.raw_dir(cfg.data.name), paths.own_copies(cfg.data.name)))
