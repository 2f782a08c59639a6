"""Small fake datasets in the exact formats torchvision downloads, for tests without internet.

MNIST-style datasets are four gzip'd IDX files; CIFAR-10 is one tar.gz of
Python pickles under `cifar-10-batches-py/`. Everything is seeded and gzip
timestamps are fixed, so the same call gives the same bytes (and MD5s).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.datasets import CIFAR10, MNIST

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class FakeDataset:
    files: dict[str, bytes]  # what the mirror serves, by file name
    train_images: torch.Tensor  # uint8 [N, C, H, W], as load_raw should return them
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    members: dict[str, bytes] = field(default_factory=dict)  # CIFAR-10: extracted files by name

    def md5(self, name: str) -> str:
        return md5(self.files[name])


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def random_split(generator: torch.Generator, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 10  # every class present
    return images, labels[torch.randperm(n, generator=generator)]


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

def idx_gz(array: np.ndarray) -> bytes:
    """IDX file of unsigned bytes: 0, 0, type 0x08, ndim, then big-endian uint32 sizes and the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def mnist_files(n_train: int = 60, n_test: int = 20, seed: int = 0) -> FakeDataset:
    """The four official MNIST file names (Fashion-MNIST uses the same ones) holding random 28x28 digits."""
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = random_split(generator, n_train, (28, 28))
    test_images, test_labels = random_split(generator, n_test, (28, 28))
    names = [filename for filename, _ in MNIST.resources]
    blobs = [idx_gz(t.numpy()) for t in (train_images, train_labels, test_images, test_labels)]
    return FakeDataset(dict(zip(names, blobs)), train_images.unsqueeze(1), train_labels,
                       test_images.unsqueeze(1), test_labels)


# ---------------------------------------------------------------- CIFAR-10

def cifar_batch(images: torch.Tensor, labels: torch.Tensor, name: str) -> bytes:
    # The official batches are Python 2 pickles: bytes keys, data as uint8 [N, 3072] rows (R, G, B planes).
    entry = {b"batch_label": name.encode(), b"labels": labels.tolist(),
             b"data": images.reshape(len(images), -1).numpy(),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
    return pickle.dumps(entry, protocol=2)


def cifar10_archive(per_batch: int = 6, n_test: int = 10, seed: int = 0) -> FakeDataset:
    generator = torch.Generator().manual_seed(seed)
    train = [random_split(generator, per_batch, (3, 32, 32)) for _ in CIFAR10.train_list]
    test_images, test_labels = random_split(generator, n_test, (3, 32, 32))
    members = {filename: cifar_batch(images, labels, filename)
               for (filename, _), (images, labels) in zip(CIFAR10.train_list, train)}
    members["test_batch"] = cifar_batch(test_images, test_labels, "test_batch")
    members["batches.meta"] = pickle.dumps({b"label_names": [name.encode() for name in CIFAR_CLASSES],
                                            b"num_cases_per_batch": per_batch, b"num_vis": 3072}, protocol=2)
    archive = tar_gz([(file_info(f"cifar-10-batches-py/{name}", len(blob)), blob) for name, blob in members.items()])
    return FakeDataset({CIFAR10.filename: archive},
                       torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                       test_images, test_labels, members)


def file_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode = size, kind, linkname, 0o644
    return info


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar.gz of exactly these members, unchecked: tests use it to build hostile archives too."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, blob in members:
            tar.addfile(info, io.BytesIO(blob) if blob is not None else None)
    return gzip.compress(buffer.getvalue(), mtime=0)  # tarfile's own "w:gz" stamps the current time
