"""dvc.yaml says what each stage depends on and writes; these tests keep it true by deriving it from the code."""

import ast

import pytest
import yaml

from helpers import REPO
from helpers.imports import MODULES, _tree, closure, stage_files, stage_modules
from pipeline import paths, stages

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def command(stage: dict) -> str:
    return stage["cmd"].split("python -m pipeline ")[1].split()[0]


@pytest.mark.parametrize("name", list(DVC))
def test_code_deps_are_exactly_the_modules_the_stage_imports(name):
    stage = DVC[name]
    declared = {dep.removeprefix("pipeline/") for dep in stage["deps"] if dep.startswith("pipeline/")}
    assert declared == stage_modules(command(stage)), (
        f"{name}: missing {sorted(stage_modules(command(stage)) - declared)}, "
        f"not imported {sorted(declared - stage_modules(command(stage)))}")


@pytest.mark.parametrize("name", list(DVC))
def test_param_deps_are_exactly_what_the_stage_reads(name):
    assert DVC[name].get("params", []) == stages.PARAMS[name]


def test_the_import_analysis_sees_lazy_imports_and_a_removed_dep_would_fail():
    # train imports MLflow's module only when tracking is on: it still counts
    assert "tracking" in stage_modules("train") and "tuning" not in stage_modules("train")
    assert "tuning" in stage_modules("tune") and "evaluation.py" in stage_modules("report")
    # a stage's own module and the package's __init__.py count, its sibling stages' do not
    assert {"stages/__init__.py", "stages/report.py"} <= stage_modules("report")
    assert "stages/train.py" not in stage_modules("report")
    deps = [dep for dep in DVC["evaluate"]["deps"] if dep != "pipeline/loop.py"]
    assert {d.removeprefix("pipeline/") for d in deps if d.startswith("pipeline/")} != stage_modules("evaluate")


def test_outputs_are_the_paths_the_code_writes():
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for stage in DVC.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    for path in (paths.SAMPLES_PNG, paths.BEST_PARAMS, paths.TRIALS_CSV, paths.TUNE_PLOTS, paths.METRICS_JSON,
                 paths.MODELS_JSON,
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
    for module in (MODULES | stage_files()) - {"__init__", "__main__"}:
        reached = closure({module}) - {module}
        assert all(module not in closure({other}) for other in reached if other not in ("cli", "__main__")), module


def test_lower_modules_never_reach_up():
    order = ["errors", "paths", "processes", "metrics", "files", "config", "datasets", "data", "batching", "models",
             "evaluation", "comparison", "reporting", "distributed", "devices", "optim", "loop", "population", "board",
             "tracking", "serving", "training", "lr_finder", "tuning", "stages", "commands", "cli"]
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


def test_the_dataset_list_is_one_fact():
    """config.DatasetName (what params.yaml may say) and datasets.KINDS (what the pipeline can fetch and decode)
    name the same datasets, in the same order; and each kind's module has the two functions a kind must have."""
    import typing

    from pipeline import datasets
    from pipeline.config import DatasetName

    assert list(datasets.KINDS) == list(typing.get_args(DatasetName))
    for name in datasets.KINDS:
        assert callable(datasets.module(name).fetch) and callable(datasets.module(name).load), name


# Params a stage reads that cannot change what it writes, so dvc.yaml rightly leaves them out of its deps.
NEVER_OUTPUTS = {
    "tracking.": "MLflow only: outputs hold no run ids or timings",
    "train.resume": "a resumed run ends with exactly the outputs of an uninterrupted one (test_loop, test_resume)",
    "data.loader_workers": "streamed batches are the same whatever the number of readers (test_streaming)",
    "tune.workers": "how many processes share the study (its exact trial count: test_tuning_workers)",
    "tune.storage": "where the study lives",
    "tune.lock": "where the study's lock lives",
    "tune.heartbeat_interval": "how often a live trial says so",
    "tune.grace_period": "when a silent trial is judged dead",
}


def config_reads(monkeypatch, cfg, call) -> set[str]:
    """The dotted params `call()` reads, as the stage's own code reads them, from `cfg` and from every config made
    from params (`config.validate`: overrides, a trial's config, tuned params). Not read from params: a config the
    stage rebuilds from a file it depends on (a model file's), and the config's validators at work."""
    import sys

    from pipeline import config

    params: set[int] = set()  # ids of the sections of configs made from params

    def register(made):
        params.update(id(section) for section in (made, made.data, made.data.augment, made.model, made.train,
                                                  made.tracking, made.tune, made.tune.resources, made.lr_find,
                                                  *made.tune.space.values()))
        return made

    register(cfg)
    validate = config.validate

    prefixes = {config.Config: "", config.DataConfig: "data.", config.AugmentConfig: "data.augment.",
                config.ModelConfig: "model.", config.TrainConfig: "train.", config.TrackingConfig: "tracking.",
                config.TuneConfig: "tune.", config.SearchDimension: "tune.space.*.", config.LrFindConfig: "lr_find.",
                config.TrialResources: "tune.resources."}
    read: set[str] = set()
    original = config.Section.__getattribute__

    def recording(self, name):
        field = type(self).model_fields.get(name)
        if field is not None and field.annotation not in prefixes and id(self) in params \
                and sys._getframe(1).f_code.co_filename != config.__file__:  # a leaf, read by the stage's code
            read.add(prefixes[type(self)] + name)
        return original(self, name)

    with monkeypatch.context() as patched:
        patched.setattr(config, "validate", lambda *args, **kwargs: register(validate(*args, **kwargs)))
        patched.setattr(config.Section, "__getattribute__", recording)
        call()
    return read


@pytest.mark.slow
def test_each_stage_reads_only_the_params_dvc_yaml_gives_it(repo_copy, monkeypatch):
    """Runs every stage's function on tiny settings, recording each param its code reads: each one must be among
    the stage's params in dvc.yaml (or in NEVER_OUTPUTS, with its reason). A stage that starts reading a param
    without saying so (report reading model.name) would be left stale by `dvc repro` when that param changes."""
    from pipeline.config import load_config
    from pipeline.stages.download import download
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.lr_find import lr_find
    from pipeline.stages.prepare import prepare
    from pipeline.stages.report import report
    from pipeline.stages.train import train, tuned
    from pipeline.stages.tune import tune

    monkeypatch.chdir(repo_copy)
    cfg = load_config(repo_copy / "params.yaml", [
        "train.epochs=1", "tune.epochs=1", "tune.n_trials=2", "tune.population=2", "tune.startup_trials=1",
        "tracking.enabled=false", "comparison=[logreg]", "train.device=cpu", "train.threads=1"])
    runs = {"download": lambda: download(cfg), "prepare": lambda: prepare(cfg),
            "train": lambda: train(cfg.for_model("logreg"), "logreg"),
            "lr_find": lambda: lr_find(cfg.with_overrides({"lr_find.steps": 20})),
            "tune": lambda: tune(cfg.with_overrides({"tune.lr_from_finder": True}), []),
            "train_final": lambda: train(tuned(cfg, paths.BEST_PARAMS), paths.FINAL),
            "evaluate": lambda: evaluate(cfg), "report": lambda: report(cfg)}
    from pipeline import config

    set_by = {"train": ["model.name"],  # train@<model> runs `train --model <model>`, and DVC tracks its cmd
              # every trial's train.epochs, train.monitor and train.resume come from tune.* (tuning.trial_config)
              "tune": [f"train.{name}" for name in config._SET_BY_SEARCH]}
    for name, run in runs.items():
        declared = DVC[name].get("params", []) + set_by.get(name, [])
        undeclared = sorted(key for key in config_reads(monkeypatch, cfg, run)
                            if not any(key == d or key.startswith(d + ".") for d in declared)
                            and not any(key.startswith(never) for never in NEVER_OUTPUTS))
        assert not undeclared, f"{name} reads {undeclared}, which dvc.yaml does not list among its params"
