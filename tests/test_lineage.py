"""The lineage tags a run gets from dvc.lock: the prepared data's hash as DVC recorded it, read again when the
lock changes (a search tags every trial's run from one process; the lock is parsed once per version)."""

import os

from pipeline import paths
from pipeline.tracking import lineage


def write_lock(path, md5: str) -> None:
    path.write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m pipeline prepare\n    outs:\n"
                    f"    - path: {paths.PREPARED_DIR}\n      md5: {md5}\n      size: 1\n")


def test_the_prepared_data_hash_comes_from_the_current_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lineage._dvc_locked_md5(str(paths.PREPARED_DIR)) is None  # not a DVC repo (yet)
    write_lock(tmp_path / "dvc.lock", "a" * 32 + ".dir")
    assert lineage._dvc_locked_md5(str(paths.PREPARED_DIR)) == "a" * 32 + ".dir"
    assert lineage._dvc_locked_md5("models/other") is None
    write_lock(tmp_path / "dvc.lock", "b" * 40 + ".dir")  # `dvc repro` ran prepare again
    os.utime(tmp_path / "dvc.lock", ns=(1, 1))  # even where the clock has not moved on
    assert lineage._dvc_locked_md5(str(paths.PREPARED_DIR)) == "b" * 40 + ".dir"
