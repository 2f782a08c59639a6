"""An image folder (one sub-folder per class, as torchvision's ImageFolder reads it, optionally split into
train/, val/, test/) decoded to uint8 tensors of one size and mode: in memory, or straight into a file when it is
larger than memory."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from pipeline import files, processes
from pipeline.config import DataConfig
from pipeline.datasets import Listing, RawDataset, write_manifest
from pipeline.datasets.downloads import one_line
from pipeline.errors import UserError

IMAGE_MODES = {1: "L", 3: "RGB"}


def fetch(cfg: DataConfig, root: Path, own: Path) -> str:
    """DVC sees a folder outside the repo only through this manifest: re-run `download` after changing it."""
    return write_manifest(cfg, root, folder_manifest(Path(cfg.path), cfg.follow_symlinks))


def load(cfg: DataConfig, root: Path, out: BinaryIO | None = None, listing: Listing | None = None) -> RawDataset:
    return load_folder(Path(cfg.path), cfg.channels, cfg.image_size, cfg.skip_bad_images, cfg.follow_symlinks, out,
                       listing)


def folder_bytes(listing: Listing, cfg: DataConfig) -> int:
    """What a scanned folder's images take decoded (before decoding them): files x channels x image_size**2."""
    _, parts = listing
    return sum(len(files) for part in parts.values() for files in part.values()) * cfg.channels * cfg.image_size ** 2


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def load_folder(path: Path, channels: int, image_size: int, skip_bad_images: bool,
                follow_symlinks: bool = False, out: BinaryIO | None = None, listing: Listing | None = None
                ) -> RawDataset:
    """ImageFolder-style dir decoded to tensors (or into `out`, see `load`).

    Classes are the class sub-folders sorted by name, as in torchvision's
    ImageFolder; files without an image extension (.txt, .DS_Store) are ignored.
    A folder that comes split (train/, val/, test/ sub-folders, each with the
    class folders, as ImageNet-style sets and the tutorials' ants/bees have it)
    keeps its splits; the others are carved from train by `prepare`.
    """
    image_mode(channels)
    classes, parts = listing or scan_folder(path, follow_symlinks)
    order = [part for part in ("train", "val", "test") if part in parts]
    entries = [(part, label, file) for part in order for label, name in enumerate(classes)
               for file in parts[part].get(name, [])]
    images, kept = decode_images([file for _, _, file in entries], channels, image_size, skip_bad_images, out)
    skipped = [file for (_, _, file), ok in zip(entries, kept) if not ok]
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) in {path} (first: {skipped[0]})", file=sys.stderr)
    found = {part: torch.tensor([label for (p, label, _), ok in zip(entries, kept) if ok and p == part],
                                dtype=torch.int64) for part in order}
    emptied = sorted(set(range(len(classes))) - set(found["train"].tolist()))
    if emptied:
        raise UserError(f"class folder {split_folders(path)['train'] / classes[emptied[0]]} holds no readable images")
    counts = [len(found[part]) for part in order]
    pieces = dict(zip(order, images.split(counts))) if images is not None else {}
    return RawDataset(pieces.get("train"), found["train"], pieces.get("test"), found.get("test"), classes,
                      source=str(path.resolve()), val_images=pieces.get("val"), val_labels=found.get("val"))


def split_folders(root: Path) -> dict[str, Path]:
    """{"train": root} for a plain class folder; {"train": root/train, "val": root/valid, ...} for a split one."""
    top = [entry.name for entry in sorted(root.iterdir()) if entry.is_dir()]
    if not ("train" in top and all(name in SPLIT_FOLDERS for name in top)):
        return {"train": root}
    named: dict[str, Path] = {}
    for name in top:
        if SPLIT_FOLDERS[name] in named:
            raise UserError(f"{root} has two {SPLIT_FOLDERS[name]} folders ({named[SPLIT_FOLDERS[name]].name}/ and "
                            f"{name}/); keep one")
        named[SPLIT_FOLDERS[name]] = root / name
    return named


def scan_folder(root: Path, follow_symlinks: bool = False) -> Listing:
    """(classes, {split: {class: image files}}) of an image folder: what `prepare` decodes and `download` tracks.

    A plain class folder is all "train"; one with train/ (and val/, test/)
    sub-folders keeps those splits, whose classes must be train's.
    A symlink whose target lies outside `root` is refused unless
    `follow_symlinks` is set: data reached that way would change without DVC
    (or the manifest) knowing, or expose files the user never meant to share.
    """
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    inside = root.resolve()

    def check(entry: Path) -> None:
        if entry.is_symlink() and not follow_symlinks and not entry.resolve().is_relative_to(inside):
            raise UserError(f"{entry} is a symlink to {entry.resolve()}, outside {root}: copy the files in, or set "
                            "data.follow_symlinks=true to follow such links (their content is then tracked too)")

    def class_folders(folder: Path) -> dict[str, list[Path]]:
        check(folder)
        entries = sorted(folder.iterdir())
        for entry in entries:
            check(entry)
        return {entry.name: image_files(entry, check) for entry in entries if entry.is_dir()}

    named = split_folders(root)
    parts = {part: class_folders(folder) for part, folder in named.items()}
    classes = sorted(parts["train"])
    if len(classes) < 2:
        raise UserError(f"{named['train']} needs at least 2 class sub-folders, found {len(classes)}")
    for part, folders in parts.items():
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise UserError(f"{named[part] / unknown[0]} is a class that {named['train']} does not have; "
                            "every split needs the training split's classes")
        for name, paths in folders.items():
            if not paths:
                raise UserError(f"class folder {named[part] / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, parts


def folder_manifest(folder: Path, follow_symlinks: bool = False) -> dict:
    """Every image of an image folder with its size and MD5: what DVC tracks for a folder outside the repo."""
    _, parts = scan_folder(folder, follow_symlinks)
    return {"source": str(folder.resolve()),
            "files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "md5": files.file_digest(p)}
                      for part in parts.values() for paths in part.values() for p in paths}}


def image_files(folder: Path, check=lambda entry: None) -> list[Path]:
    """Image files under `folder`, recursive and sorted like ImageFolder's make_dataset; `check` sees every entry.

    Symlinked sub-folders are walked (once each: a link loop cannot trap the walk).
    """
    found, seen = [], set()
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        for name in sorted(subdirs) + sorted(names):
            check(Path(directory) / name)
        found += [Path(directory) / name for name in names
                  if has_file_allowed_extension(name, IMG_EXTENSIONS) and (Path(directory) / name).is_file()]
    return sorted(found)


PARALLEL_FROM = 512  # images: below this, starting worker processes costs more than it saves


PROGRESS_S = 5.0


def decode_images(paths: list[Path], channels: int, image_size: int, skip_bad_images: bool,
                  out: BinaryIO | None = None) -> tuple[torch.Tensor | None, list[bool]]:
    """(the readable images stacked, or None when written to `out` one by one; which paths were readable).

    Worker processes decode large folders (Pillow holds the GIL while it decodes,
    so threads would take turns), in order; progress goes to stderr.
    """
    decode = functools.partial(_decode_or_reason, channels=channels, image_size=image_size)
    kept, stacked, started, shown = [], [], time.perf_counter(), time.perf_counter()
    with _pool(len(paths)) as pool:
        results = pool(decode, paths)
        for done, (path, (array, reason)) in enumerate(zip(paths, results), 1):
            if array is None and not skip_bad_images:
                raise UserError(reason)
            kept.append(array is not None)
            if array is not None:
                if out is not None:
                    out.write(array.tobytes())
                else:
                    stacked.append(torch.from_numpy(array))
            if time.perf_counter() - shown > PROGRESS_S:
                shown = time.perf_counter()
                print(f"decoded {done:,}/{len(paths):,} images ({done / (shown - started):,.0f}/s)", file=sys.stderr)
    if len(paths) >= PARALLEL_FROM:
        seconds = time.perf_counter() - started
        print(f"decoded {len(paths):,} images in {seconds:.1f}s ({len(paths) / seconds:,.0f}/s)", file=sys.stderr)
    if out is not None or not stacked:
        return None, kept
    return torch.stack(stacked), kept


@contextlib.contextmanager
def _pool(n: int):
    """An ordered map: worker processes for large jobs (forked on Linux, where that is cheap), else in-process."""
    workers = processes.available_cores()
    if n < PARALLEL_FROM or workers < 2:
        yield map
        return
    method = "fork" if sys.platform == "linux" else None  # the workers only run Pillow and NumPy
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        yield lambda fn, items: pool.map(fn, items, chunksize=64)


def _decode_or_reason(path: Path, channels: int, image_size: int) -> tuple[np.ndarray | None, str]:
    try:
        return load_image_array(path, channels, image_size), ""
    except UserError as error:
        return None, str(error)


def load_image(path: Path, channels: int, image_size: int) -> torch.Tensor:
    """One image file of any size/mode (PNG/JPEG; L, RGB, RGBA, P) -> uint8 [C, H, W] converted like the training data.

    Mode L for 1 channel, RGB for 3; resized (not cropped) to image_size x
    image_size. Raises UserError naming the path for a missing/non-image/corrupt file.
    """
    return torch.from_numpy(load_image_array(path, channels, image_size))


def load_image_array(path: Path, channels: int, image_size: int) -> np.ndarray:
    """`load_image` as a NumPy array (what decoding workers send back)."""
    mode = image_mode(channels)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF: use the image as people see it
            image = to_mode(image, mode)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)  # a copy: writable, as torch wants
            return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    except FileNotFoundError as error:
        raise UserError(f"image not found: {path}") from error
    # Decoders of broken files raise a zoo of exception types; all of them mean "bad file".
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {one_line(error)}") from error


def image_mode(channels: int) -> str:
    if channels not in IMAGE_MODES:
        raise UserError(f"image channels must be 1 or 3, got {channels}")
    return IMAGE_MODES[channels]


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode.startswith("I;16"):
        # Pillow's convert clips 16-bit values to 255 (nearly all white); keep the top 8 bits instead.
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode not in ("L", "RGB"):
        # Palette, alpha, CMYK, bilevel...: through RGB first, so L comes from real colours (alpha is dropped,
        # as torchvision's ImageFolder loader does).
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)
