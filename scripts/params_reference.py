"""docs/params.md from the config's own fields: every key, its type, default, bounds and description.

    python scripts/params_reference.py          # rewrite docs/params.md
    python scripts/params_reference.py --check  # exit 1 if docs/params.md is not what the config says

The descriptions live once, in pipeline/config.py; tests/test_config.py checks that the page matches them.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydantic import BaseModel  # noqa: E402

from pipeline.config import Config  # noqa: E402

PAGE = REPO / "docs" / "params.md"
BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))


def type_name(annotation) -> str:
    """A field's type as a reader of params.yaml thinks of it (choices spelled out, None as null)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(choice) for choice in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"{type_name(args[0])}: {type_name(args[1])}"
    if origin is typing.Annotated:  # PositiveInt
        return f"{type_name(args[0])} > 0"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def bounds(field) -> str:
    found = []
    for item in field.metadata:
        for name, sign in BOUNDS:
            if getattr(item, name, None) is not None:
                found.append(f"{sign} {getattr(item, name)}")
    return ", ".join(found)


def rows(model: type[BaseModel], prefix: str = "") -> list[list[str]]:
    table = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            table += rows(annotation, f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        table.append([f"`{key}`", type_name(annotation), f"`{shown}`", bounds(field), field.description or ""])
    return table


def page() -> str:
    lines = ["# Params reference", "",
             "Every key of `params.yaml`, generated from `pipeline/config.py` by `python scripts/params_reference.py`"
             " (never edit by hand). Set them in `params.yaml`, with `--set key=value` on any command, or with "
             "`dvc exp run -S key=value`; a value outside its type or bounds stops the command with one line "
             "naming it.", "",
             "| key | type | default | bounds | what it does |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows(Config)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/params_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
