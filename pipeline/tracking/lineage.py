"""What a run is tagged with so that a number traces back to its code, data and environment."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import redact

# Code and params a run depends on: only changes to these make its `git.dirty` tag true.
SOURCE_PATHS = ("pipeline", "params.yaml", "dvc.yaml", "pyproject.toml")


def lineage_tags(cfg: Config, data_md5: str, role: str) -> dict[str, str]:
    """Everything needed to trace a number back to its code, data and environment."""
    import torch

    tags = {
        "pipeline.role": role,
        "pipeline.config_fingerprint": cfg.fingerprint(),
        "data.name": cfg.data.name,
        "data.md5": data_md5,
        "torch.version": torch.__version__,
        "torch.cuda": torch.version.cuda or "none",
        "device": cfg.train.device,
        "python.version": platform.python_version(),
        "mlflow.source.name": redact("python -m pipeline " + " ".join(sys.argv[1:])),
        "mlflow.source.type": "LOCAL",
    }
    commit, dirty = git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(dirty).lower()
    dvc_md5 = _dvc_locked_md5(str(paths.PREPARED_DIR))
    if dvc_md5:
        tags["dvc.data.md5"] = dvc_md5
    for variable, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_STAGE", "dvc.stage"),
                          ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def git_state() -> tuple[str | None, bool]:
    """(HEAD commit, whether the pipeline's code or params differ from it), or (None, False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


def _dvc_locked_md5(path: str) -> str | None:
    """The hash DVC recorded for `path` in dvc.lock, if this is a DVC repo that has run it."""
    lock = Path("dvc.lock")
    try:
        stat = lock.stat()
    except FileNotFoundError:
        return None
    return _locked_outs(lock.resolve(), stat.st_mtime_ns, stat.st_size).get(path)


@functools.lru_cache(maxsize=4)
def _locked_outs(lock: Path, mtime_ns: int, size: int) -> dict[str, str]:
    """{out path: md5} of a dvc.lock version: a search tags every trial's run, and parsing the file each time
    cost ~40 ms per run (~1 s per search); its stat is the cache key, so an edited lock is read again."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: ~7x faster
    outs = {}
    for stage in (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            outs.setdefault(out.get("path"), out.get("md5"))
    return outs
