"""Every bad input is one line on stderr and exit code 2 (1 for a failed check), with nothing saved changed.

Each case runs the CLI's entry point (`pipeline.cli.main`, what `python -m pipeline` calls) in its own copy of a
small, fully built repository, then compares every file of that copy with what it was before the command (and
looks for leftover temporary files). Cases that set up process-wide state (MLflow's, Optuna's) run in a process
of their own; the others in this one, saving a Python start each (~3 s of CPU, ~30 cases).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers import REPO, copy_repo, edit_params, run_cli

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, prepared_template):
    """A repo with prepared digits, trained logreg/cnn/final models (1 epoch), evaluation and report; untracked."""
    repo = copy_repo(tmp_path_factory.mktemp("world") / "repo")
    edit_params(repo, {"comparison": ["logreg"], "model.name": "logreg", "train.epochs": 1,
                       "tracking.enabled": False})
    shutil.copytree(prepared_template, repo / "data" / "prepared")
    for command in (["train", "--model", "logreg"], ["train", "--final"], ["evaluate"], ["report"]):
        run_cli(*command, cwd=repo, check=True)
    return repo


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts
            and not p.relative_to(root).as_posix().startswith(".dvc/tmp/")}  # DVC's own scratch, as .git is git's


def one_image_per_class(repo: Path) -> list[str]:
    from PIL import Image

    for name in ("a", "b", "c"):
        (repo / "one" / name).mkdir(parents=True)
        Image.new("L", (8, 8), color=40).save(repo / "one" / name / "x.png")
    return ["--set", "data.name=folder", "--set", f"data.path={repo / 'one'}"]


def corrupt(relative: str, content: bytes = b"\x00garbage") -> Callable[[Path], list[str]]:
    def setup(repo: Path) -> list[str]:
        (repo / relative).write_bytes(content)
        return []
    return setup


def truncate(relative: str) -> Callable[[Path], list[str]]:
    def setup(repo: Path) -> list[str]:
        blob = (repo / relative).read_bytes()
        (repo / relative).write_bytes(blob[: len(blob) // 2])
        return []
    return setup


def resume_point(content: bytes | str) -> Callable[[Path], list[str]]:
    """A broken resume point exactly where `train --model cnn` looks for its own (its first seed replicate's)."""
    def setup(repo: Path) -> list[str]:
        code = ("import sys; from pipeline import data, training; from pipeline.config import load_config; "
                "cfg = load_config('params.yaml', ['model.name=cnn']); "
                "print(training.resume_keys(cfg, data.load_prepared(__import__('pathlib').Path('data/prepared')).md5)[0])")
        key = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        path = repo / "checkpoints" / "cnn" / f"{key}.pt"
        path.parent.mkdir(parents=True)
        if content == "unusable weights":  # every key a resume point has, none of it this run's
            import torch

            torch.save({"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "history": [],
                        "best_epoch": 0, "best_score": 1.0, "best_state": {}, "bad_epochs": 0,
                        "rng": {"torch": torch.get_rng_state(), "cuda": [], "batches": {}}}, path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else b"PK\x03\x04" + b"\x00" * 100)
        return []
    return setup


def edited_model(relative: str, change: Callable[[dict], dict]) -> Callable[[Path], list[str]]:
    """A model file of the world with `change` applied to its payload."""
    def setup(repo: Path) -> list[str]:
        import torch

        payload = torch.load(repo / relative, weights_only=True)
        torch.save(change(payload), repo / relative)
        return []
    return setup


class Foreign:
    """Any class of anyone's: pickled by reference, so loading it would import and run code."""


def edited_text(relative: str, change: Callable[[str], str]) -> Callable[[Path], list[str]]:
    def setup(repo: Path) -> list[str]:
        (repo / relative).write_text(change((repo / relative).read_text()))
        return []
    return setup


@dataclass
class Case:
    args: list[str]
    message: str
    setup: Callable[[Path], list[str]] | None = None
    code: int = 2
    marks: list = field(default_factory=list)
    process: bool = False  # in a `python -m pipeline` process of its own
    env: dict = field(default_factory=dict)


CASES = {
    # params files
    "params not UTF-8": Case(["prepare", "--params", "latin1.yaml"], "latin1.yaml: not UTF-8 text (byte 0xe9",
                             setup=lambda repo: (repo / "latin1.yaml").write_bytes(b"seed: 4\n# caf\xe9\n") and []),
    "params is a directory": Case(["prepare", "--params", "data"], "params file data is a directory"),
    "params missing": Case(["prepare", "--params", "nope.yaml"], "params file not found: nope.yaml"),
    "params broken YAML": Case(["prepare", "--params", "broken.yaml"], "broken.yaml: not valid YAML at line",
                               setup=lambda repo: (repo / "broken.yaml").write_text("train: {epochs: 3\n") and []),
    "malformed --set YAML": Case(["prepare", "--set", "train.lr=[1"], "--set train.lr: not valid YAML"),
    "--set without =": Case(["prepare", "--set", "train.lr"], "expected key=value"),
    "duplicate YAML key": Case(["prepare", "--params", "dup.yaml"], "duplicate key 'seed'",
                               setup=lambda repo: (repo / "dup.yaml").write_text("seed: 1\nseed: 2\n") and []),
    "duplicate comparison entry": Case(["prepare", "--set", "comparison=[cnn, mlp, cnn]"],
                                       "comparison: lists cnn more than once"),
    "alias bomb": Case(["prepare", "--params", "bomb.yaml"], "aliases (*name) are not supported",
                       setup=lambda repo: (repo / "bomb.yaml").write_text(
                           "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
                               f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
                           + "seed: *i\n") and []),
    "unknown command option": Case(["prepare", "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    # values valid in type, impossible at run time
    "negative seed": Case(["prepare", "--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
    "seed beyond 2**32": Case(["prepare", "--set", "seed=4294967296"], "seed: Input should be less than 4294967296"),
    "val fraction below one per class": Case(["prepare", "--set", "data.val_fraction=0.005"],
                                             "data.val_fraction=0.005 carves 8 of 1437 images", marks=[slow]),
    "test fraction below one per class": Case(["prepare", "--set", "data.test_fraction=0.001"],
                                              "data.test_fraction=0.001 carves 2 of 1797 images", marks=[slow]),
    "one image per class": Case(["prepare"], "has 1 image(s) left to divide", setup=one_image_per_class,
                                marks=[slow]),
    "log interval not a number": Case(["train"], "PIPELINE_LOG_SECONDS='soon' is not a number of seconds",
                                      env={"PIPELINE_LOG_SECONDS": "soon"}),
    "lr-find with min above max": Case(["lr-find", "--set", "lr_find.min_lr=1", "--set", "lr_find.max_lr=0.1"],
                                       "lr_find: min_lr (1) must be below max_lr (0.1)"),
    "lr-find with too few steps": Case(["lr-find", "--set", "lr_find.steps=5"],
                                       "lr_find.steps: Input should be greater than or equal to 17"),
    "lr from a range test never run": Case(["tune", "--set", "tune.lr_from_finder=true"],
                                           "suggestion.json: run `python -m pipeline "
                                           "lr-find`"),
    "ray engine with workers": Case(["tune", "--set", "tune.engine=ray", "--set", "tune.workers=2"],
                                    "with tune.engine ray, Ray places the trials itself"),
    "tune --workers 0": Case(["tune", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
    "symlink out of the folder": Case(["download"], "outside", setup=lambda repo: symlinked_folder(repo)),
    # devices
    "cuda without CUDA": Case(["train", "--set", "train.device=cuda"], "train.device=cuda, but this machine has no "
                              "CUDA device", marks=[slow]),
    "mps without MPS": Case(["train", "--set", "train.device=mps"], "train.device=mps, but MPS", marks=[slow]),
    # stores
    "tracking URI with an unknown scheme": Case(["train", "--set", "tracking.enabled=true",
                                                 "--set", "tracking.uri=ftp://x/y"], "unsupported scheme 'ftp'",
                                                marks=[slow], process=True),
    "tracking server that is not there": Case(["train", "--set", "tracking.enabled=true",
                                               "--set", "tracking.uri=http://127.0.0.1:9"],
                                              "MLflow server http://127.0.0.1:9 does not answer", marks=[slow],
                                              process=True),
    "journal in a missing folder": Case(["tune", "--set", "tune.storage=nowhere/optuna.journal"],
                                        "tune.storage: folder nowhere does not exist", marks=[slow], process=True),
    "unsupported storage": Case(["tune", "--set", "tune.storage=mysql://u:secret@127.0.0.1:9/db"],
                                "tune.storage 'mysql://u:***@127.0.0.1:9/db': use a SQLite URL", marks=[slow],
                                process=True),
    "postgres that is not there": Case(["tune", "--set", "tune.storage=postgresql://u:secret@127.0.0.1:9/db"],
                                       "postgresql://u:***@127.0.0.1:9/db", marks=[slow], process=True),
    "grpc proxy without its lock": Case(["tune", "--set", "tune.storage=grpc://127.0.0.1:9"],
                                        "a gRPC storage proxy has no lock of its own; set tune.lock", marks=[slow],
                                        process=True),
    "grpc proxy that is not there": Case(["tune", "--set", "tune.storage=grpc://127.0.0.1:9", "--set",
                                          "tune.lock=postgresql://u:secret@127.0.0.1:9/db"],
                                         "cannot reach the gRPC storage proxy at grpc://127.0.0.1:9", marks=[slow],
                                         process=True),
    # corrupt state
    "resume point empty": Case(["train", "--model", "cnn"], "is unreadable", setup=resume_point(b""), marks=[slow]),
    "resume point random bytes": Case(["train", "--model", "cnn"], "delete it to train from scratch",
                                      setup=resume_point(bytes(range(7, 250, 3))), marks=[slow]),
    "resume point truncated zip": Case(["train", "--model", "cnn"], "is unreadable", setup=resume_point("zip"),
                                       marks=[slow]),
    "tensors.pt corrupt": Case(["train"], "data/prepared is corrupt", setup=truncate("data/prepared/tensors.pt"),
                               marks=[slow]),
    "meta.json corrupt": Case(["train"], "data/prepared/meta.json is corrupt",
                              setup=corrupt("data/prepared/meta.json", b"{\"classes\": [")),
    "no experiments": Case(["experiments"], "no DVC experiments of HEAD to show: run one, e.g. `dvc exp run -S"),
    "eval metrics corrupt": Case(["report"], "reports/eval/logreg/metrics.json is corrupt",
                                 setup=corrupt("reports/eval/logreg/metrics.json")),
    "best params corrupt": Case(["train", "--final", "--tuned", "reports/tune/best_params.json"],
                                "reports/tune/best_params.json is corrupt",
                                setup=lambda repo: (repo / "reports/tune").mkdir(parents=True) or
                                (repo / "reports/tune/best_params.json").write_text("{oops") and []),
    "best params of another shape": Case(["train", "--final", "--tuned", "bp.json"],
                                         "bp.json is not a search's best-params record",
                                         setup=lambda repo: (repo / "bp.json").write_text("[1, 2]") and []),
    "model file corrupt": Case(["evaluate"], "cannot read model file models/logreg/model.pt",
                               setup=corrupt("models/logreg/model.pt"), marks=[slow]),
    # inputs with no upper bound: refused before anything runs (hardening, group 3)
    "params file of 2 MiB": Case(["prepare", "--params", "big.yaml"], "big.yaml is larger than 1024 KiB",
                                 setup=lambda repo: (repo / "big.yaml").write_text("# x\n" * (1 << 19)) and []),
    "params from /dev/zero": Case(["prepare", "--params", "/dev/zero"], "params file /dev/zero is larger than"),
    "10**23 epochs": Case(["train", "--set", "train.epochs=100000000000000000000000"],
                          "train.epochs: Input should be less than or equal to 100000"),
    "100000 workers": Case(["tune", "--set", "tune.workers=100000"],
                           "tune.workers: Input should be less than or equal to 256"),
    "a layer a billion wide": Case(["train", "--set", "model.channels=[32, 1000000000]"],
                                   "model.channels[1]: Input should be less than or equal to 65536"),
    "a hundred million trials": Case(["tune", "--set", "tune.n_trials=100000000"],
                                                "tune.n_trials: Input should be less than or equal to 100000"),
    # messages that named the wrong cause (group 4)
    "a batch larger than the training split": Case(
        ["train", "--set", "train.batch_size=5000", "--set", "train.drop_last=true"],
        "train.batch_size 5000 with train.drop_last: the 1221 training images make no full batch"),
    "a searched key set by --set": Case(["prepare", "--set", "tune.space.train.lr.low=5"],
                                        "--set tune.space.train.lr.low: tune.space.train.lr: low (5) must be below"),
    # values accepted that meant nothing (group 5)
    "epochs: true": Case(["train", "--set", "train.epochs=true"], "train.epochs: Input should be a valid integer"),
    "lr as a string": Case(["train", "--set", "train.lr='0.1'"], "train.lr: Input should be a valid number"),
    "searching what the search sets": Case(["prepare", "--params", "searched.yaml"],
                                           "tune.space: 'train.epochs' is set by the search for every trial",
                                           setup=lambda repo: with_searched(repo, "train.epochs", (1, 5))),
    "an ftp mirror": Case(["download", "--set", "data.mirror=ftp://x"],
                          "data.mirror: 'ftp://x': a mirror is an http://, https:// or file:// base URL"),
    # corrupt stores and files written by earlier stages (group 2)
    "a corrupt mlflow.db": Case(["train", "--set", "tracking.enabled=true", "--set",
                                 "tracking.uri=sqlite:///broken-mlflow.db"],
                                "broken-mlflow.db is not a readable SQLite database",
                                setup=corrupt("broken-mlflow.db", b"SQLite format 3\x00" + bytes(200)),
                                marks=[slow], process=True),
    "resume point of unusable weights": Case(["train", "--model", "cnn"], "does not fit this run",
                                             setup=resume_point("unusable weights"), marks=[slow]),
    "history with a non-number": Case(["report"], "reports/train/logreg/history.csv is corrupt (could not convert",
                                      setup=edited_text("reports/train/logreg/history.csv",
                                                        lambda text: text.replace("\n1,", "\n1,x", 1))),
    "history without epochs": Case(["report"], "reports/train/logreg/history.csv holds no epochs",
                                   setup=edited_text("reports/train/logreg/history.csv",
                                                     lambda text: text.splitlines()[0] + "\n")),
    "model file without its mean": Case(["evaluate"], "models/logreg/model.pt lacks mean",
                                        setup=edited_model("models/logreg/model.pt",
                                                           lambda payload: {k: v for k, v in payload.items()
                                                                            if k != "mean"})),
    "model file with std 0": Case(["evaluate"], "models/logreg/model.pt has input std [0.0]",
                                  setup=edited_model("models/logreg/model.pt", lambda payload: {**payload,
                                                                                                "std": [0.0]})),
    "model file with a pickle payload": Case(["evaluate"], "it holds pickled Python objects, so it is no model file",
                                             setup=edited_model("models/logreg/model.pt",
                                                                lambda payload: {**payload, "extra": Foreign()})),
    # a secret with a "/" (group 1): masked where the driver reads it
    "postgres password with a slash": Case(["tune", "--set", "tune.storage=postgresql://u:se/cret@127.0.0.1:9/db"],
                                           "postgresql://u:***@127.0.0.1:9/db", marks=[slow], process=True),
}


def with_searched(repo: Path, key: str, bounds: tuple) -> list[str]:
    """searched.yaml: params.yaml with `key` in tune.space."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"]["space"][key] = {"low": bounds[0], "high": bounds[1]}
    (repo / "searched.yaml").write_text(yaml.safe_dump(params))
    return []


def symlinked_folder(repo: Path) -> list[str]:
    from PIL import Image

    outside = repo.parent / "outside"
    for name in ("a", "b"):
        (outside / name).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(outside / name / "x.png")
    (repo / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(repo / "imgs" / "a" / "y.png")
    (repo / "imgs" / "b").symlink_to(outside / "b", target_is_directory=True)
    return ["--set", "data.name=folder", "--set", f"data.path={repo / 'imgs'}"]


@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, name, monkeypatch, capsys):
    case = CASES[name]
    repo = tmp_path / "repo"
    shutil.copytree(world, repo, symlinks=True)
    extra = (case.setup(repo) or []) if case.setup else []
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(repo)
    if case.process:
        result = run_cli(*case.args, *extra, cwd=repo)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        code, stdout, stderr = main_in(repo, [*case.args, *extra], monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == case.code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert case.message in lines[0], lines[0]
    assert "secret" not in stderr + stdout and "cret" not in stderr + stdout
    assert snapshot(repo) == before, "a rejected command changed saved files"


def main_in(repo: Path, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m pipeline ARGV` in `repo`, in this process: (exit code, stdout, stderr)."""
    from pipeline import cli

    monkeypatch.chdir(repo)
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's way out
        code = exit_.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_full_disk_leaves_the_previous_outputs_and_no_debris(world, tmp_path):
    """RLIMIT_FSIZE makes every write past 20 kB fail as a full disk would (EFBIG instead of ENOSPC)."""
    repo = tmp_path / "repo"
    shutil.copytree(world, repo)
    before = snapshot(repo)

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--set", "data.split_seed=3"], cwd=repo,
                            capture_output=True, text=True, preexec_fn=small_disk)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "cannot write data/prepared/tensors.pt: File too large" in lines[0]
    assert snapshot(repo) == before


def as_nobody() -> list[str] | None:
    """A command prefix running as an unprivileged user (root ignores file permissions), or None if not possible."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import pipeline.cli"], cwd=REPO, capture_output=True)
    return prefix if probe.returncode == 0 else None


@slow
def test_a_read_only_reports_folder_is_one_line_and_changes_nothing(world):
    prefix = as_nobody()
    if prefix is None:
        pytest.skip("cannot run as an unprivileged user here (the environment is not readable by nobody)")
    root = Path(tempfile.mkdtemp(prefix="read-only-"))
    try:
        os.chmod(root, 0o755)
        repo = root / "repo"
        shutil.copytree(world, repo)
        for path in [repo, *repo.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        for path in [repo / "reports", *(repo / "reports").rglob("*")]:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        before = snapshot(repo)
        result = subprocess.run([*prefix, sys.executable, "-m", "pipeline", "report"], cwd=repo,
                                capture_output=True, text=True, env={**os.environ, "HOME": str(root)})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "cannot write reports/compare.md: Permission denied" in lines[0]
        assert snapshot(repo) == before
    finally:
        for path in root.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)
