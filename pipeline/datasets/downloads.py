"""Files from the network, never half-written: HTTP with retries on transient errors, verified renames, and
archive extraction that refuses members which could land outside their folder.

torchvision's `download_url` writes straight to the final path and checks the
MD5 afterwards, so an interrupted or corrupt download is left where a later run
finds it. Here every file is written to a temporary name, verified, and only
then renamed into place; an archive is extracted to a temporary folder, member
by member checked, and renamed into place.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from torchvision.datasets.utils import USER_AGENT

from pipeline import files
from pipeline.errors import UserError

BACKOFF_S = 1.0  # first wait before a retry; doubles every attempt


TIMEOUT_S = 60.0  # per connect/read, not per file


CHUNK_BYTES = 1 << 20


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
