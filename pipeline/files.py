"""The one way files are written (atomically) and read (with one-line errors).

Every write goes to a unique temporary file beside the target and is renamed
over it only once complete, so an interrupted or failed write (a full disk, a
read-only folder, Ctrl-C) leaves the previous file intact and no debris; two
processes writing the same file never share a temporary name. Failures become
one-line `UserError`s naming the path.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read it without changing it


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files: others sharing the repo must read them
        os.replace(temp, path)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        temp.unlink(missing_ok=True)


def write_error(path: Path, err: OSError) -> UserError:
    reason = err.strerror or str(err)
    return UserError(f"cannot write {path}: {reason}; free space or fix permissions and run again "
                     "(the previous file, if any, is unchanged)")


def write_bytes(path: Path, blob: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(blob)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, header: Sequence[str], rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, serialised in memory first: a failing disk then raises OSError, not a torch RuntimeError."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """Arrays as a compressed .npz (numpy.load reads it without pickle), the same bytes for the same arrays:
    numpy's savez stamps each member with the time of writing, which would make every re-run a change to DVC."""
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)
    write_bytes(path, buffer.getvalue())


def read_npz(path: Path, remedy: str = "") -> dict:
    """An .npz written by `write_npz`, every array loaded (never unpickled); unreadable -> one line."""
    import zipfile

    import numpy as np

    blob = read_bytes(path, remedy)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{path} is corrupt ({err}); " + (remedy or "delete it and re-run the stage that wrote it")
                        ) from None


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file of any size, read in chunks."""
    import hashlib

    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()


def copy_file(source: Path, dest: Path) -> None:
    write_bytes(dest, read_bytes(source))


def read_bytes(path: Path, remedy: str = "") -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing {path}" + (f": {remedy}" if remedy else "")) from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def read_json(path: Path, remedy: str = "") -> Any:
    """A JSON file written by an earlier stage; missing or corrupt -> one line saying what to re-run."""
    blob = read_bytes(path, remedy)
    try:
        return json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}); " + (remedy or "delete it and re-run the stage that wrote it")
                        ) from None


def read_csv(path: Path, remedy: str = "") -> list[dict[str, str]]:
    text = read_bytes(path, remedy).decode(errors="replace")
    return list(csv.DictReader(io.StringIO(text)))
