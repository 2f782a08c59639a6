"""`python -m pipeline <command>`: the entry point every DVC stage calls.

Each command reads params.yaml (or --params PATH), applies `--set key=value`
overrides (the dotted keys of `dvc exp run -S`), validates once, and hands the
Config to its stage. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path

from pipeline.errors import CheckFailed, UserError, one_line

# Failures of the machine, not of the code: reported like bad input (one line, exit 2).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line on stderr with exit code 2 like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `python -m pipeline --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param by dotted key, e.g. --set train.lr=0.01 (repeatable)")

    parser = Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    commands.add_parser("download", parents=[common], help="fetch raw files (torchvision datasets) -> data/raw/NAME/")
    commands.add_parser("prepare", parents=[common], help="split the dataset into train/val/test tensors")
    train = commands.add_parser("train", parents=[common], help="train one model with the shared loop")
    who = train.add_mutually_exclusive_group()
    who.add_argument("--model", help="model to train (default: model.name); writes models/NAME/")
    who.add_argument("--final", action="store_true", help="train model.name as the final model: models/final/")
    train.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                       help="data-parallel on N processes (torchrun; gloo on CPU, nccl on CUDA)")
    train.add_argument("--tuned", metavar="JSON", help="apply a search's best params (reports/tune/best_params.json)")
    tune = commands.add_parser("tune", parents=[common], help="Optuna search for model.name -> reports/tune/")
    tune.add_argument("--workers", type=positive_int, metavar="N", help="worker processes (default: tune.workers)")
    tune.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child started by --workers
    commands.add_parser("evaluate", parents=[common], help="test-set metrics of every trained model")
    report = commands.add_parser("report", parents=[common], help="final metrics, comparison table and plots")
    report.add_argument("--tuned", metavar="JSON", help="the search the final model's params came from "
                        "(reports/tune/best_params.json): compare.md says what it shipped and why")
    predict = commands.add_parser("predict", parents=[common], help="classify image files (top-3 probabilities)")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--model", dest="model_uri", metavar="URI",
                         help="MLflow model URI, e.g. models:/digits-cnn/1 (default: models/final/model.pt)")
    reproduce = commands.add_parser("reproduce", parents=[common],
                                    help="retrain an MLflow run from its config; exit 0 only if test metrics match")
    reproduce.add_argument("run_id")
    reproduce.add_argument("--within-seeds", action="store_true",
                           help="pass when each test metric lies within mean ± 2 std of the model's seed replicates "
                                "instead of exactly (the default where exactness is not promised: CUDA without "
                                "deterministic kernels)")
    experiments = commands.add_parser("experiments", parents=[common],
                                      help="DVC's experiments of HEAD in 120 columns: what each changed, the final "
                                           "model's test accuracy, and whether it beats the baseline")
    experiments.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table to FILE")
    plots = commands.add_parser("plots", parents=[common],
                                help="DVC's plots as one HTML page that renders offline (Vega inline, no CDN)")
    plots.add_argument("revisions", nargs="*", metavar="REV", help="compare these git revisions or experiments "
                       "(dvc plots diff); default: the workspace (dvc plots show)")
    plots.add_argument("-o", "--out", type=Path, default=Path("dvc_plots"), help="folder of index.html")
    plots.add_argument("--template-only", action="store_true", help="only write the offline page and name it in "
                       ".dvc/config.local, so that plain `dvc plots show` renders offline (make repro does this)")
    compare = commands.add_parser("compare", parents=[common],
                                  help="is A better than B? every pair of results judged on the same test images")
    compare.add_argument("sources", nargs="+", metavar="RESULT",
                         help="an MLflow run id, models:/NAME@ALIAS, or a git revision / DVC experiment name "
                              "(optionally REV:RUN, default RUN final)")
    compare.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table to FILE")
    lr_find = commands.add_parser("lr-find", parents=[common],
                                  help="learning-rate range test (lr_find.*): where the loss falls fastest, "
                                       "and the range to search -> reports/lr_find/NAME/")
    lr_find.add_argument("--model", help="model to test (default: model.name)")
    ui = commands.add_parser("ui", parents=[common],
                             help="mlflow ui + optuna-dashboard + tensorboard on 127.0.0.1 (Ctrl-C stops)")
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--optuna-port", type=int, default=8080)
    ui.add_argument("--tensorboard-port", type=int, default=6006)
    ui.add_argument("--verbose", action="store_true", help="show the servers' own logs (access logs included)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so checkpoints stay and MLflow runs end KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `option VALUE` / `option=VALUE` (the ranks torchrun starts must not start ranks themselves)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            kept.append(item)
    return kept


def _say(line: str) -> None:
    """A line on stderr; of several ranks (torchrun sets RANK) only rank 0 speaks, the others fail the same way."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:  # not yet started by torchrun
        from pipeline import distributed

        return distributed.launch(args.nproc, _without_option(argv, "--nproc"))
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run(args)
    except UserError as err:
        _say(f"error: {one_line(str(err))}")
        return 2
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        _say(f"error: {one_line(where + (err.strerror or str(err)))}; free space or fix permissions and run again")
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        _say("terminated" if terminated else "interrupted")
        return 143 if terminated else 130
    except CheckFailed as failed:
        _say(f"error: {one_line(str(failed))}")
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    from pipeline.config import load_config
    from pipeline.paths import FINAL

    # each stage's module is imported in its own branch: its code deps in dvc.yaml are that module's imports
    cfg = load_config(args.params, args.overrides, model=getattr(args, "model", None))
    if args.command == "download":
        from pipeline.stages.download import download

        download(cfg)
    elif args.command == "prepare":
        from pipeline.stages.prepare import prepare

        prepare(cfg)
    elif args.command == "train":
        from pipeline.stages.train import train, tuned

        if args.tuned:
            cfg = tuned(cfg, Path(args.tuned))
        train(cfg, FINAL if args.final else cfg.model.name)
    elif args.command == "tune":
        from pipeline.stages.tune import tune

        if args.workers:
            cfg = cfg.with_overrides({"tune.workers": args.workers}, source="--workers")
        # the workers see this process's params, and how many they are (to share the cores)
        worker_args = ["--params", args.params, *(f"--set={item}" for item in args.overrides),
                       f"--set=tune.workers={cfg.tune.workers}"]
        tune(cfg, worker_args, worker=args.worker)
    elif args.command == "lr-find":
        from pipeline.stages.lr_find import lr_find

        lr_find(cfg)
    elif args.command == "evaluate":
        from pipeline.stages.evaluate import evaluate

        evaluate(cfg)
    elif args.command == "report":
        from pipeline.stages.report import report

        report(cfg, Path(args.tuned) if args.tuned else None)
    else:  # commands for people, not DVC stages
        from pipeline import commands

        if args.command == "predict":
            commands.predict(cfg, args.images, args.model_uri)
        elif args.command == "reproduce":
            commands.reproduce(cfg, args.run_id, args.within_seeds)
        elif args.command == "plots":
            if args.template_only:
                commands.offline_plots_template()
            else:
                commands.plots(args.out, args.revisions)
        elif args.command == "experiments":
            commands.experiments(cfg, args.markdown)
        elif args.command == "compare":
            commands.compare(cfg, args.sources, args.markdown)
        elif args.command == "ui":
            commands.ui(cfg, args.mlflow_port, args.optuna_port, args.tensorboard_port, args.verbose)
