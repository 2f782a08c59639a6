"""Which pipeline modules a `python -m pipeline <command>` stage runs, read from the source (no execution).

A stage runs the package's entry modules, the CLI branch of its command, the
stage functions that branch calls (and the stage functions those call), and
every pipeline module those import, at module level or inside functions,
transitively. Lazy imports count: code that runs only with tracking on still
decides what the stage writes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
ENTRY = ("__init__", "__main__", "cli")
# the pipeline's modules by name: its files (loop.py: "loop") and its sub-packages (population/: "population")
MODULES = {path.stem for path in PACKAGE.glob("*.py")} | {path.parent.name for path in PACKAGE.glob("*/__init__.py")}


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def _tree(module: str) -> ast.Module:
    """A module's source; a sub-package's is every file of it, as one."""
    sources = sorted((PACKAGE / module).rglob("*.py")) if (PACKAGE / module).is_dir() else [PACKAGE / f"{module}.py"]
    return ast.Module(body=[node for source in sources for node in ast.parse(source.read_text()).body],
                      type_ignores=[])


def file_name(module: str) -> str:
    """How dvc.yaml names a module: its file (loop.py) or its sub-package's folder (population)."""
    return module if (PACKAGE / module).is_dir() else f"{module}.py"


def _imported(node: ast.AST) -> set[str]:
    """pipeline modules imported anywhere under `node`."""
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom) and item.module:
            if item.module == "pipeline":
                found |= {alias.name for alias in item.names if _is_module(alias.name)}
            elif item.module.startswith("pipeline."):
                found.add(item.module.split(".")[1])
        elif isinstance(item, ast.Import):
            found |= {alias.name.split(".")[1] for alias in item.names if alias.name.startswith("pipeline.")}
    return found


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
            if module not in shallow:
                todo += _imported(_tree(module)) - seen
    return seen


def _cli_branch(command: str) -> list[ast.stmt]:
    """The statements `cli.run` executes for `command` (its `if args.command == ...` branch), with the
    statements of `run` outside any such branch."""
    run = next(node for node in _tree("cli").body if isinstance(node, ast.FunctionDef) and node.name == "run")
    branch = next(node for node in ast.walk(run) if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                  and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == command)
    return [*branch.body, *(node for node in run.body if not isinstance(node, ast.If))]


def stage_functions(command: str) -> set[str]:
    """The functions of stages.py that `python -m pipeline <command>` calls: its CLI branch, then their callees."""
    called = {node.attr for statement in _cli_branch(command) for node in ast.walk(statement)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "stages"}
    functions = {node.name: node for node in _tree("stages").body if isinstance(node, ast.FunctionDef)}
    todo, seen = list(called), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        todo += [node.id for node in ast.walk(functions[name]) if isinstance(node, ast.Name) and node.id in functions]
    return seen


def stage_modules(command: str) -> set[str]:
    """Every pipeline module `python -m pipeline <command>` can run, as dvc.yaml names them (`file_name`)."""
    stages = _tree("stages")
    functions = {node.name: node for node in stages.body if isinstance(node, ast.FunctionDef)}
    direct = set().union(*(_module_level(_tree(module)) for module in ENTRY), _module_level(stages),
                         *(_imported(statement) for statement in _cli_branch(command)),
                         *(_imported(functions[name]) for name in stage_functions(command)))
    return {file_name(module) for module in closure(direct | {*ENTRY, "stages"}, shallow={*ENTRY, "stages"})}
