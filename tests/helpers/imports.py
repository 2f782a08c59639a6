"""Which pipeline modules a `python -m pipeline <command>` stage runs, read from the source (no execution).

A stage runs the package's entry modules, the CLI branch of its command, the
stage module that branch imports (pipeline/stages/<stage>.py, with the stages
package's __init__.py), and every pipeline module those import, at module level
or inside functions, transitively. Lazy imports count: code that runs only with
tracking on still decides what the stage writes. Other sub-packages count whole
(population/); the stages package counts file by file, so one stage's code is
not another's dep.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
ENTRY = ("__init__", "__main__", "cli")
PER_FILE = "stages"  # the sub-package whose files count one by one: "stages.train" is pipeline/stages/train.py
# the pipeline's modules by name: its files (loop.py: "loop") and its sub-packages (population/: "population")
MODULES = {path.stem for path in PACKAGE.glob("*.py")} | {path.parent.name for path in PACKAGE.glob("*/__init__.py")}


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


@functools.cache  # the cycle test walks every module's closure: each file is parsed once
def _tree(module: str) -> ast.Module:
    """A module's source; a sub-package's is every file of it, as one."""
    sources = sorted((PACKAGE / module).rglob("*.py")) if (PACKAGE / module).is_dir() else [PACKAGE / f"{module}.py"]
    return ast.Module(body=[node for source in sources for node in ast.parse(source.read_text()).body],
                      type_ignores=[])


@functools.cache
def _file_tree(module: str) -> ast.Module:
    """What importing `module` runs of the per-file package: "stages" is its __init__.py alone."""
    if module == PER_FILE or module.startswith(PER_FILE + "."):
        return ast.parse((PACKAGE / file_name(module)).read_text())
    return _tree(module)


def stage_files() -> set[str]:
    """The stage modules, as `closure` names them: {"stages.train", ...}."""
    return {f"{PER_FILE}.{path.stem}" for path in (PACKAGE / PER_FILE).glob("*.py") if path.stem != "__init__"}


def file_name(module: str) -> str:
    """How dvc.yaml names a module, under pipeline/: its file (loop.py), its sub-package's folder (population),
    or a stage module's file (stages/train.py, stages/__init__.py)."""
    if module == PER_FILE:
        return f"{PER_FILE}/__init__.py"
    if module.startswith(PER_FILE + "."):
        return module.replace(".", "/") + ".py"
    return module if (PACKAGE / module).is_dir() else f"{module}.py"


def _module(dotted: str) -> str:
    """pipeline.loop -> loop; pipeline.tuning.search -> tuning (a package counts whole); pipeline.stages.train ->
    stages.train."""
    parts = dotted.split(".")[1:]
    return f"{PER_FILE}.{parts[1]}" if parts[0] == PER_FILE and len(parts) > 1 else parts[0]


def _imported(node: ast.AST) -> set[str]:
    """pipeline modules imported anywhere under `node`."""
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom) and item.module:
            if item.module == "pipeline":
                found |= {alias.name for alias in item.names if _is_module(alias.name)}
            elif item.module.startswith("pipeline."):
                found.add(_module(item.module))
        elif isinstance(item, ast.Import):
            found |= {_module(alias.name) for alias in item.names if alias.name.startswith("pipeline.")}
    return found


@functools.cache
def _imports_of(module: str) -> frozenset[str]:
    return frozenset(_imported(_file_tree(module)))


def _module_level(tree: ast.Module) -> set[str]:
    return set().union(*(_imported(node) for node in tree.body if not isinstance(node, (ast.FunctionDef,
                                                                                        ast.ClassDef))))


def closure(modules: set[str], shallow: set[str] = frozenset()) -> set[str]:
    """`modules` and everything they import (anywhere in them), transitively; `shallow` ones are not expanded."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            if module.startswith(PER_FILE + "."):
                todo.append(PER_FILE)  # importing a package's module runs its __init__.py first
            if module not in shallow:
                todo += _imports_of(module) - seen
    return seen


def _cli_branch(command: str) -> list[ast.stmt]:
    """The statements `cli.run` executes for `command` (its `if args.command == ...` branch), with the
    statements of `run` outside any such branch."""
    run = next(node for node in _tree("cli").body if isinstance(node, ast.FunctionDef) and node.name == "run")
    branch = next(node for node in ast.walk(run) if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                  and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == command)
    return [*branch.body, *(node for node in run.body if not isinstance(node, ast.If))]


def stage_modules(command: str) -> set[str]:
    """Every pipeline module `python -m pipeline <command>` can run, as dvc.yaml names them (`file_name`)."""
    direct = set().union(*(_module_level(_tree(module)) for module in ENTRY),
                         *(_imported(statement) for statement in _cli_branch(command)))
    return {file_name(module) for module in closure(direct | set(ENTRY), shallow=set(ENTRY))}
