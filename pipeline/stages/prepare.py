"""`prepare`: raw data -> data/prepared/ (uint8 tensors split train/val/test) and a grid of samples."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline import paths
from pipeline.config import Config


def prepare(cfg: Config) -> None:
    """Decode once into uint8 tensors with a seeded, stratified train/val(/test) split, plus a sample grid.

    Data within data.memory_limit_mb stays resident (one tensor, on the training device); larger data is streamed
    from a memory-mapped file (a folder's images are decoded straight into it, never all held in memory).
    """
    import torch

    from pipeline import data, datasets, files, reporting

    root, out = paths.raw_dir(cfg.data.name), paths.PREPARED_DIR
    limit = cfg.data.memory_limit_mb * 2 ** 20
    with contextlib.ExitStack() as stack:
        # A streamed dataset's images go to a temporary file that replaces images.u8 only once the splits and
        # their files are written: a bad image or a split error leaves the previous prepared data whole.
        def images_file() -> Path:
            return stack.enter_context(files.atomic_path(out / data.IMAGES_FILE))

        listing = None
        if datasets.KINDS[cfg.data.name].folder:  # torchvision's image helpers, imported only where needed
            from pipeline.datasets import folders

            listing = folders.scan_folder(Path(cfg.data.path), cfg.data.follow_symlinks)
        if listing and folders.folder_bytes(listing, cfg.data) > limit:
            images_path = images_file()
            with open(images_path, "wb") as stream:
                raw = datasets.load(cfg.data, root, out=stream, listing=listing)
        else:
            raw = datasets.load(cfg.data, root, listing=listing)
            parts = [part for part in (raw.train_images, raw.val_images, raw.test_images) if part is not None]
            images_path = images_file() if sum(part.numel() for part in parts) > limit else None
            if images_path:  # a downloaded dataset fits in memory while prepared, not beside training
                with open(images_path, "wb") as stream:
                    for part in parts:
                        stream.write(part.contiguous().numpy().tobytes())
        splits = data.splits_of(raw, cfg.data, cfg.data.split_seed, images_path)
        meta = data.save_prepared(out, splits, raw.classes, source=raw.source, images_path=images_path)
    samples, first = splits["train"], torch.arange(min(9, len(splits["train"])))
    reporting.plot_samples(samples.take(first), [raw.classes[i] for i in samples.labels[first].tolist()],
                           paths.SAMPLES_PNG, title=f"{cfg.data.name}: training samples")
    how = "streamed from disk (above" if images_path else "resident (within"
    print(f"prepared {cfg.data.name}: {meta['sizes']} images of shape {meta['shape']}, {how} "
          f"data.memory_limit_mb={cfg.data.memory_limit_mb:g}) -> {out}")
