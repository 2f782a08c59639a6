"""MNIST, Fashion-MNIST and CIFAR-10: torchvision's files, verified against their official MD5s, decoded to
uint8 tensors with their official train and test splits.

Mirrors, file names and MD5s are read from torchvision's dataset classes at
call time (not its download code: see `downloads`). Local copies come first:
the official files already on disk, compressed or not, in `data.path`, in the
user's own folder (data/local/<name>/), or in torchvision's layout
(<root>/MNIST/raw/), are verified and used without any network access. A file
is accepted when its MD5 is the official one (of either form) or one the user
gave in `data.checksums`; a bad file the user placed is moved aside, named,
never deleted. CIFAR-10's pickled batches are unpickled only once verified.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import numpy as np
import torch
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from pipeline import files
from pipeline.config import DataConfig
from pipeline.datasets import Listing, RawDataset
from pipeline.datasets.downloads import copy_folder, extract_tar, fetch_verified, mirror_url, one_line
from pipeline.errors import UserError

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10")


IDX_CLASSES = {"mnist": MNIST, "fashion_mnist": FashionMNIST}


# The official files as distributed uncompressed (torchvision lists only the .gz MD5s). Fashion-MNIST publishes
# none: verify such copies yourself and give their MD5s in data.checksums.
UNCOMPRESSED_MD5 = {
    "mnist": {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
              "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
              "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
              "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
}


def fetch(cfg: DataConfig, root: Path, own: Path) -> str:
    local = Path(cfg.path) if cfg.path else None
    fetched = download(cfg.name, root, cfg.mirror, cfg.retries, cfg.checksums, local, own)
    return f"verified {cfg.name}: {', '.join(path.name for path in fetched)} in {root}"


def load(cfg: DataConfig, root: Path, out: BinaryIO | None = None, listing: Listing | None = None) -> RawDataset:
    return load_raw(cfg.name, root, cfg.checksums)


def download(name: str, root: Path, mirror: str | None = None, retries: int = 3,
             checksums: dict[str, str] | None = None, local: Path | None = None, own: Path | None = None
             ) -> list[Path]:
    """Put a torchvision dataset's verified raw files into `root` (e.g. data/raw/mnist/); returns what it holds.

    Each file is taken from the first place that has it with an accepted MD5
    (see `accepted_md5s`): `root` itself, a local copy (`local`, i.e.
    `data.path`; `own`, the user's folder of copies, data/local/<name>/; or
    torchvision's layout beside either), and only then the network: `mirror`
    (http(s):// or file://) instead of torchvision's mirrors, each URL tried
    `1 + retries` times on transient errors. `root` is a DVC output, which DVC
    empties before the stage runs: a user's copies belong in `own`, never there.
    """
    check_dataset_name(name)
    if mirror is not None and urlsplit(mirror).scheme not in ("http", "https", "file"):
        raise UserError(f"dataset mirror must be an http://, https:// or file:// URL, got {mirror!r}")
    if retries < 0:
        raise UserError(f"download retries must be >= 0, got {retries}")
    checksums = checksums or {}
    root.mkdir(parents=True, exist_ok=True)
    sources = local_sources(name, root, local, own)
    own = own or root  # where a failed download tells the user to put their copy
    if name == "cifar10":
        return [download_cifar(root, sources, local, own, mirror, retries, checksums)]
    dataset = IDX_CLASSES[name]
    fetched = []
    for filename, md5 in dataset.resources:
        forms = idx_forms(name, filename, md5, checksums)
        found = in_root(root, forms) or copy_local(sources, root, forms)
        if found is None:
            urls = [base + filename for base in dataset.mirrors] if mirror is None else [mirror_url(mirror, filename)]
            found = fetch_verified(root / filename, forms[filename], urls, retries, own)
        fetched.append(found)
    return fetched


def accepted_md5s(official: str | None, filename: str, checksums: dict[str, str]) -> set[str]:
    """The official MD5 (when one is known) and the user's own for this file name (a private copy)."""
    return {md5 for md5 in (official, checksums.get(filename)) if md5}


def idx_forms(name: str, gz_name: str, gz_md5: str, checksums: dict[str, str]) -> dict[str, set[str]]:
    """Both forms of an IDX file (as published, .gz; and uncompressed) with the MD5s accepted for each."""
    plain = gz_name.removesuffix(".gz")
    return {gz_name: accepted_md5s(gz_md5, gz_name, checksums),
            plain: accepted_md5s(UNCOMPRESSED_MD5.get(name, {}).get(plain), plain, checksums)}


def local_sources(name: str, root: Path, local: Path | None, own: Path | None = None) -> list[Path]:
    """Folders that may hold a local copy, flat or in torchvision's layout (`<tv root>/MNIST/raw/`): `data.path`,
    the user's own copies (data/local/<name>/, data/local/MNIST/raw/) and torchvision's layouts around `root`."""
    sub = Path(IDX_CLASSES[name].__name__) / "raw" if name in IDX_CLASSES else Path(CIFAR10.base_folder)
    sources = [*([own, own / sub, own.parent / sub] if own is not None else []), root / sub, root.parent / sub]
    if local is not None:
        if not local.is_dir():
            raise UserError(f"data.path {local} is not a folder; point it at your copy of the {name} files")
        sources = [local, local / sub, *sources]
    return sources


def in_root(root: Path, forms: dict[str, set[str]]) -> Path | None:
    """A verified file already in `root`; a file there that fails verification is moved aside, with a message."""
    for filename, accepted in forms.items():
        path = root / filename
        if path.is_file():
            actual = files.file_digest(path)
            if actual in accepted:
                return path
            require_known(path, accepted)
            set_aside(path, actual, accepted)
    return None


def copy_local(sources: list[Path], root: Path, forms: dict[str, set[str]]) -> Path | None:
    """The first local copy found, verified and copied into `root` (where `prepare` reads, and DVC tracks)."""
    for source in sources:
        for filename, accepted in forms.items():
            path = source / filename
            if not path.is_file():
                continue
            actual = files.file_digest(path)
            require_known(path, accepted)
            if actual not in accepted:
                raise UserError(f"{path} has MD5 {actual}, not the official {' or '.join(sorted(accepted))}: "
                                f"replace it with the official file, or set data.checksums.{filename}={actual} "
                                "if it is a private copy you trust")
            with files.atomic_path(root / filename) as temp:
                shutil.copyfile(path, temp)
            print(f"using local copy {path} (MD5 verified)", file=sys.stderr)
            return root / filename
    return None


def require_known(path: Path, accepted: set[str]) -> None:
    if not accepted:
        raise UserError(f"no published MD5 for {path} to verify it against: check the file yourself and set "
                        f"data.checksums.{path.name}=<its md5>, or use the official .gz file instead")


def set_aside(path: Path, actual: str, accepted: set[str]) -> Path:
    """Move a file that failed verification out of the way, keeping it for its owner to inspect."""
    aside = path.with_name(f"{path.name}.rejected-{actual[:8]}")
    os.replace(path, aside)
    print(f"{path} has MD5 {actual}, expected {' or '.join(sorted(accepted))}: moved aside to {aside}",
          file=sys.stderr)
    return aside


def download_cifar(root: Path, sources: list[Path], local: Path | None, own: Path, mirror: str | None,
                   retries: int, checksums: dict[str, str]) -> Path:
    """The extracted batches folder: kept if intact, else copied from a local copy, else extracted from the
    (local or downloaded) archive."""
    folder = root / CIFAR10.base_folder
    if cifar_folder_intact(folder, checksums):
        return folder
    for source in sources:
        for candidate in (source, source / CIFAR10.base_folder):
            if candidate != folder and cifar_folder_intact(candidate, checksums):
                copy_folder(candidate, folder)
                print(f"using local copy {candidate} (MD5s verified)", file=sys.stderr)
                return folder
    forms = {CIFAR10.filename: accepted_md5s(CIFAR10.tgz_md5, CIFAR10.filename, checksums)}
    # data.path, the user's own copies (data/local/cifar10/ and data/local/), torchvision's root (data/raw)
    archive_sources = [*([local] if local else []), *([own, own.parent] if own != root else []), root.parent]
    archive = in_root(root, forms) or copy_local(archive_sources, root, forms)
    if archive is None:
        urls = [CIFAR10.url] if mirror is None else [mirror_url(mirror, CIFAR10.filename)]
        archive = fetch_verified(root / CIFAR10.filename, forms[CIFAR10.filename], urls, retries, own)
    extract_tar(archive, folder)
    if not cifar_folder_intact(folder, checksums):
        raise UserError(f"{archive} passed its MD5 check but its batch files do not: delete {archive} and run again")
    return folder


def check_dataset_name(name: str) -> None:
    if name not in TORCHVISION_DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(TORCHVISION_DATASETS)}")


def cifar_folder_intact(folder: Path, checksums: dict[str, str] | None = None) -> bool:
    return folder.is_dir() and all(
        path.is_file() and files.file_digest(path) in accepted_md5s(md5, path.name, checksums or {})
        for path, md5 in cifar_files(folder))


def cifar_files(folder: Path) -> list[tuple[Path, str]]:
    """Every extracted CIFAR-10 file with its official MD5 (read from torchvision now, so tests can patch it)."""
    listed = [*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]
    return [(folder / filename, md5) for filename, md5 in listed]


def load_raw(name: str, root: Path, checksums: dict[str, str] | None = None) -> RawDataset:
    """Decode the raw files `download` put in `root` into RawDataset (official train and test splits)."""
    check_dataset_name(name)
    checksums = checksums or {}
    if name == "cifar10":
        return load_cifar10(root / CIFAR10.base_folder, checksums)
    dataset = IDX_CLASSES[name]
    train_images_file, train_labels_file, test_images_file, test_labels_file = (
        idx_forms(name, filename, md5, checksums) for filename, md5 in dataset.resources)
    train_images, train_labels = load_idx_split(root, train_images_file, train_labels_file)
    test_images, test_labels = load_idx_split(root, test_images_file, test_labels_file)
    return RawDataset(train_images, train_labels, test_images, test_labels, list(dataset.classes),
                      source=f"torchvision.datasets.{dataset.__name__}, MD5s verified")


def load_idx_split(root: Path, images_forms: dict[str, set[str]], labels_forms: dict[str, set[str]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 1, 28, 28] and labels int64 [N] from IDX files, gzip'd or not (see `idx_forms`)."""
    images_path, images = read_idx_form(root, images_forms)
    labels_path, labels = read_idx_form(root, labels_forms)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise UserError(f"{images_path} {tuple(images.shape)} does not match {labels_path} {tuple(labels.shape)}")
    return images.unsqueeze(1), labels.long()


def read_idx_form(root: Path, forms: dict[str, set[str]]) -> tuple[Path, torch.Tensor]:
    for filename, accepted in forms.items():
        path = root / filename
        if path.is_file():
            blob = verified_bytes(path, accepted)
            try:
                return path, read_idx(gzip.decompress(blob) if filename.endswith(".gz") else blob, path)
            except (OSError, EOFError, zlib.error) as error:  # a private copy whose checksum the user gave
                raise UserError(f"{path} is not a readable gzip file: {one_line(error)}") from error
    raise UserError(f"raw dataset file missing: {root / next(iter(forms))} (run `python -m pipeline download`)")


def verified_bytes(path: Path, accepted: set[str]) -> bytes:
    """The file's bytes, read once and checked against its accepted MD5s, so what is decoded is what was verified."""
    if not path.is_file():
        raise UserError(f"raw dataset file missing: {path} (run `python -m pipeline download`)")
    blob = path.read_bytes()
    actual = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if actual not in accepted:
        raise UserError(f"MD5 mismatch for {path}: expected {' or '.join(sorted(accepted)) or 'a known MD5'}, got "
                        f"{actual}; run `python -m pipeline download` to set it aside and fetch the official file")
    return blob


def read_idx(data: bytes, path: Path) -> torch.Tensor:
    """An (uncompressed) IDX file of unsigned bytes (MNIST's format) as a uint8 tensor.

    torchvision's `read_sn3_pascalvincent_tensor` opens files only by path and
    validates with `assert`, hence this small reader.
    """
    ndim = data[3] if len(data) >= 4 else 0
    if data[:3] != b"\0\0\x08" or ndim == 0 or len(data) < 4 + 4 * ndim:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise UserError(f"{path}: IDX body holds {len(body)} bytes, its header says {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


def load_cifar10(folder: Path, checksums: dict[str, str]) -> RawDataset:
    # Unpickling runs code chosen by whoever wrote the file, so only bytes with an accepted MD5 are unpickled.
    def unpickle(filename: str, md5: str) -> dict:
        return pickle.loads(verified_bytes(folder / filename, accepted_md5s(md5, filename, checksums)),
                            encoding="bytes")

    def batches(listed: list) -> tuple[torch.Tensor, torch.Tensor]:
        entries = [unpickle(filename, md5) for filename, md5 in listed]
        images = np.concatenate([np.asarray(entry[b"data"], dtype=np.uint8) for entry in entries])
        labels = np.concatenate([np.asarray(entry[b"labels"], dtype=np.int64) for entry in entries])
        return torch.from_numpy(images.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)

    train_images, train_labels = batches(CIFAR10.train_list)
    test_images, test_labels = batches(CIFAR10.test_list)
    names = unpickle(CIFAR10.meta["filename"], CIFAR10.meta["md5"])[CIFAR10.meta["key"].encode()]
    classes = [name.decode() if isinstance(name, bytes) else name for name in names]
    return RawDataset(train_images, train_labels, test_images, test_labels, classes,
                      source="torchvision.datasets.CIFAR10, MD5s verified")
