"""Raw datasets (torchvision downloads or an image folder) decoded to uint8 tensors.

Downloads use torchvision's own mirrors, file names and MD5s, read from its
dataset classes at call time, but not its download code: `download_url` writes
straight to the final path and checks the MD5 afterwards, so an interrupted or
corrupt download is left where a later run finds it. Here every file is written
to a temporary name, verified, and only then renamed into place; the CIFAR-10
archive is extracted the same way, member by member checked.

Local copies come first: the official files already on disk, compressed or
not, in our layout (data/raw/<name>/), torchvision's (<root>/MNIST/raw/) or a
folder named by `data.path`, are verified and used without any network access.
A file is accepted when its MD5 is the official one (of either form) or one the
user gave in `data.checksums`; a bad file the user placed is moved aside, named,
never deleted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gzip
import hashlib
import http.client
import multiprocessing
import os
import pickle
import shutil
import socket
import struct
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.utils import USER_AGENT

from pipeline import files, processes
from pipeline.config import DataConfig
from pipeline.errors import UserError

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10")
IDX_CLASSES = {"mnist": MNIST, "fashion_mnist": FashionMNIST}

BACKOFF_S = 1.0  # first wait before a retry; doubles every attempt
TIMEOUT_S = 60.0  # per connect/read, not per file
CHUNK_BYTES = 1 << 20
IMAGE_MODES = {1: "L", 3: "RGB"}

# The official files as distributed uncompressed (torchvision lists only the .gz MD5s). Fashion-MNIST publishes
# none: verify such copies yourself and give their MD5s in data.checksums.
UNCOMPRESSED_MD5 = {
    "mnist": {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
              "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
              "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
              "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
}


Listing = tuple[list[str], dict[str, dict[str, list[Path]]]]  # scan_folder: (classes, {split: {class: files}})


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


def load(cfg: DataConfig, root: Path, out: BinaryIO | None = None, listing: Listing | None = None) -> RawDataset:
    """Any supported dataset decoded to uint8 tensors: the one entry point `prepare` uses.

    `root` is where `download` put a torchvision dataset's raw files. With `out`,
    a folder's images are written there as they are decoded (train, val, test
    rows in that order) instead of being held in memory, and come back as None.
    `listing`: the folder's `scan_folder`, when the caller already has it.
    """
    if cfg.name == "digits":
        return load_digits()
    if cfg.name == "folder":
        return load_folder(Path(cfg.path), cfg.channels, cfg.image_size, cfg.skip_bad_images, cfg.follow_symlinks,
                           out, listing)
    return load_raw(cfg.name, root, cfg.checksums)


def folder_bytes(listing: Listing, cfg: DataConfig) -> int:
    """What a scanned folder's images take decoded (before decoding them): files x channels x image_size**2."""
    _, parts = listing
    return sum(len(files) for part in parts.values() for files in part.values()) * cfg.channels * cfg.image_size ** 2


def load_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 [N, 1, 8, 8]; no official test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    # 17 grey levels spread over 0..255 keeps them distinct and lets digits share the uint8 format.
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    return RawDataset(images, labels, None, None, [str(name) for name in digits.target_names],
                      source="sklearn.datasets.load_digits")


# ---------------------------------------------------------------- download

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


def copy_folder(source: Path, folder: Path) -> None:
    """Copy a verified folder into place (see `folder_in_place`: an interrupted copy leaves no folder)."""
    with folder_in_place(folder) as temp:
        shutil.copytree(source, temp / folder.name)


@contextlib.contextmanager
def folder_in_place(folder: Path):
    """A temporary sibling of `folder` to build `<temp>/<folder.name>` in; renamed over `folder` if the block
    succeeds, so whatever an interrupted or failed block leaves is never taken for the folder."""
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".part"))
    try:
        yield temp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp / folder.name, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def check_dataset_name(name: str) -> None:
    if name not in TORCHVISION_DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(TORCHVISION_DATASETS)}")


def mirror_url(mirror: str, filename: str) -> str:
    return mirror.rstrip("/") + "/" + filename


def fetch_verified(path: Path, accepted: set[str], urls: list[str], retries: int, own: Path) -> Path:
    """`path` downloaded from the first of `urls` that works, with one of the `accepted` MD5s."""
    failures = []
    for url in urls:
        try:
            fetch_to(path, accepted, url, retries)
            return path
        except DownloadFailed as error:
            failures.append(f"{url}: {error}")
    raise UserError(f"could not download {path.name}: " + "; ".join(failures) + "; or place your copy of the file "
                    f"in {own} (compressed or not) and run again")


class DownloadFailed(Exception):
    """One URL failed for good (retries spent or a permanent error); the caller may try another mirror."""


class IncompleteDownload(Exception):
    """The connection ended before Content-Length bytes arrived (urllib does not raise for that itself)."""


def fetch_to(path: Path, accepted: set[str], url: str, retries: int) -> None:
    # The temporary name is never looked at again, so whatever a crash leaves of it can't pass as the real file.
    with files.atomic_path(path) as temp:
        fetch_with_retries(url, temp, retries)
        actual = files.file_digest(temp)
        if actual not in accepted:
            raise UserError(f"MD5 mismatch for {path.name} from {url}: expected {' or '.join(sorted(accepted))}, got "
                            f"{actual}; nothing was kept. A re-compressed copy never matches the official .gz: "
                            f"place the uncompressed file in {path.parent}, or set data.checksums.{path.name} "
                            "for a private copy you trust")


def fetch_with_retries(url: str, dest: Path, retries: int) -> None:
    for attempt in range(retries + 1):
        try:
            fetch_once(url, dest)
            return
        except (OSError, http.client.HTTPException, IncompleteDownload) as error:
            last = one_line(error)
            if not is_transient(error):
                raise DownloadFailed(last) from error
        if attempt < retries:
            wait = BACKOFF_S * 2 ** attempt
            print(f"retrying {url} in {wait:g}s ({last})", file=sys.stderr)
            time.sleep(wait)
    raise DownloadFailed(f"{last} (after {retries + 1} attempts)")


def fetch_once(url: str, dest: Path) -> None:
    print(f"downloading {url}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, dest.open("wb") as out:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise IncompleteDownload(f"connection closed after {received} of {expected} bytes")


def is_transient(error: BaseException) -> bool:
    """Worth another try: timeouts, dropped connections, HTTP 5xx (and 408/429); not 404 or a missing local file."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if isinstance(error, urllib.error.URLError):
        error = error.reason
    return isinstance(error, (TimeoutError, ConnectionError, socket.gaierror, http.client.HTTPException,
                              IncompleteDownload))


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------- CIFAR-10 archive

def extract_tar(archive: Path, folder: Path) -> None:
    """Extract the archive's `folder.name/` into `folder`, refusing members that could land outside it.

    Extraction goes to a temporary sibling that is renamed into place at the
    end, so an interrupted one leaves no `folder` for a later run to accept.
    """
    with folder_in_place(folder) as temp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    check_member(member, archive)
                if hasattr(tarfile, "data_filter"):  # PEP 706 (Python 3.11.4+): a second line of defence
                    tar.extractall(temp, members=members, filter="data")
                else:
                    tar.extractall(temp, members=members)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            raise UserError(f"cannot extract {archive}: {one_line(error)}") from error
        if not (temp / folder.name).is_dir():
            raise UserError(f"{archive} holds no {folder.name}/ folder")


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Only plain files and folders, with relative paths that stay inside the target folder."""
    # Backslashes and drive letters are checked too, so the same archive is refused on every OS.
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and ":" in parts[0]):
        reason = "has an absolute path"
    elif ".." in parts:
        reason = "points outside the target folder"
    elif member.issym() or member.islnk():
        reason = "is a link"
    elif not (member.isfile() or member.isdir()):
        reason = "is a device, FIFO or other special file"
    else:
        return
    raise UserError(f"refusing to extract {archive}: member {member.name!r} {reason}")


def cifar_folder_intact(folder: Path, checksums: dict[str, str] | None = None) -> bool:
    return folder.is_dir() and all(
        path.is_file() and files.file_digest(path) in accepted_md5s(md5, path.name, checksums or {})
        for path, md5 in cifar_files(folder))


def cifar_files(folder: Path) -> list[tuple[Path, str]]:
    """Every extracted CIFAR-10 file with its official MD5 (read from torchvision now, so tests can patch it)."""
    listed = [*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]
    return [(folder / filename, md5) for filename, md5 in listed]


# ---------------------------------------------------------------- decode downloads

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


# ---------------------------------------------------------------- image folders

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
