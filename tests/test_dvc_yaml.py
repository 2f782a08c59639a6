"""dvc.yaml says what each stage depends on and writes; these tests keep it true by deriving it from the code."""

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from imports import MODULES, _tree, closure, stage_modules
from pipeline import paths, stages

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def command(stage: dict) -> str:
    return stage["cmd"].split("python -m pipeline ")[1].split()[0]


@pytest.mark.parametrize("name", list(DVC))
def test_code_deps_are_exactly_the_modules_the_stage_imports(name):
    stage = DVC[name]
    declared = {Path(dep).name for dep in stage["deps"] if dep.startswith("pipeline/")}
    assert declared == stage_modules(command(stage)), (
        f"{name}: missing {sorted(stage_modules(command(stage)) - declared)}, "
        f"not imported {sorted(declared - stage_modules(command(stage)))}")


@pytest.mark.parametrize("name", list(DVC))
def test_param_deps_are_exactly_what_the_stage_reads(name):
    assert DVC[name].get("params", []) == stages.PARAMS[name]


def test_the_import_analysis_sees_lazy_imports_and_a_removed_dep_would_fail():
    # train imports MLflow's module only when tracking is on: it still counts
    assert "tracking.py" in stage_modules("train") and "tuning" not in stage_modules("train")
    assert "tuning" in stage_modules("tune") and "evaluation.py" in stage_modules("report")
    deps = [dep for dep in DVC["evaluate"]["deps"] if dep != "pipeline/loop.py"]
    assert {Path(d).name for d in deps if d.startswith("pipeline/")} != stage_modules("evaluate")


def test_outputs_are_the_paths_the_code_writes():
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for stage in DVC.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    for path in (paths.SAMPLES_PNG, paths.BEST_PARAMS, paths.TRIALS_CSV, paths.TUNE_PLOTS, paths.METRICS_JSON,
                 paths.COMPARE_MD, paths.PLOTS_DIR / "curves.csv", paths.PLOTS_DIR / "confusion.csv",
                 paths.PREPARED_DIR, paths.eval_dir("x").parent):
        assert str(path) in outs, path
    run = paths.RunPaths.of("${item.model}")
    for path in (run.model_dir, run.curves, run.metrics, run.history):
        assert str(path) in outs, path


def test_the_git_tracked_training_outputs_hold_no_wall_clock_values():
    """Wall-clock values stay out of what git and DVC hash (else every re-run would change dvc.lock): the
    committed history.csv files have exactly the columns metrics.py derives, none a timing, and no metrics.json
    holds a timing. (That a re-run rewrites the same bytes is test_fresh_clone's.)"""
    import csv
    import json

    from pipeline.metrics import HISTORY_COLUMNS, TIMING

    histories = sorted((REPO / "reports" / "train").glob("*/history.csv"))
    assert histories, "no committed history.csv to check"
    for path in histories:
        with path.open() as stream:
            header = next(csv.reader(stream))
        assert header == list(HISTORY_COLUMNS) and not set(TIMING) & set(header), path
    for path in [REPO / "reports" / "metrics.json", *(REPO / "reports" / "train").glob("*/metrics.json")]:
        keys = set(json.loads(path.read_text()))
        assert not keys & set(TIMING) and not any("seconds" in key for key in keys), path


def test_no_import_cycles_between_pipeline_modules():
    for module in MODULES - {"__init__", "__main__"}:
        reached = closure({module}) - {module}
        assert all(module not in closure({other}) for other in reached if other not in ("cli", "__main__")), module


def test_lower_modules_never_reach_up():
    order = ["errors", "paths", "processes", "metrics", "files", "config", "datasets", "data", "models", "evaluation",
             "reporting", "distributed", "devices", "optim", "loop", "population", "tracking", "serving", "training",
             "tuning", "stages", "commands", "cli"]
    assert set(order) == MODULES - {"__init__", "__main__"}
    for rank, module in enumerate(order):
        tree = _tree(module)
        imported = {node.module.split(".")[1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.")}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "pipeline" for alias in node.names}
        higher = {m for m in imported if m in order and order.index(m) > rank}
        assert not higher, f"{module} imports {higher}, which sit above it"


def test_the_model_list_is_one_fact():
    import typing

    from pipeline.config import ModelName
    from pipeline.models import BUILDERS

    assert list(BUILDERS) == list(typing.get_args(ModelName))
