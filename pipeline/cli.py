"""`python -m pipeline <command>`: the entry point every DVC stage calls.

Each command reads params.yaml (or --params PATH), applies `--set key=value`
overrides (the dotted keys of `dvc exp run -S`), validates once, and hands the
Config to its stage. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param by dotted key, e.g. --set train.lr=0.01 (repeatable)")

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("prepare", parents=[common], help="split the dataset into train/val/test tensors")
    train = commands.add_parser("train", parents=[common], help="train one model with the shared loop")
    who = train.add_mutually_exclusive_group()
    who.add_argument("--model", help="model to train (default: model.name); writes models/NAME/")
    who.add_argument("--final", action="store_true", help="train model.name as the final model: models/final/")
    commands.add_parser("evaluate", parents=[common], help="test-set metrics of every trained model")
    commands.add_parser("report", parents=[common], help="final metrics, comparison table and plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def run(args: argparse.Namespace) -> None:
    from pipeline import stages
    from pipeline.config import load_config

    cfg = load_config(args.params, args.overrides)
    if args.command == "prepare":
        stages.prepare(cfg)
    elif args.command == "train":
        if args.model:
            cfg = cfg.with_overrides({"model.name": args.model})
        stages.train(cfg, stages.FINAL if args.final else cfg.model.name)
    elif args.command == "evaluate":
        stages.evaluate(cfg)
    elif args.command == "report":
        stages.report(cfg)
