"""One function per DVC stage: a validated Config in, the stage's outputs out.

`PARAMS` says which params each stage reads; dvc.yaml lists exactly these.
tests/test_dvc_yaml.py checks that, that each stage's code deps are the
pipeline modules it imports, and, running every stage, that its code reads no
param it does not list. Outputs hold no timings, run ids or other
per-run noise: a deterministic re-run rewrites the same bytes, so DVC and git
see no change. Heavy modules are imported inside the stage that needs them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline import paths
from pipeline.config import Config, search_keys, training_keys
from pipeline.errors import UserError
from pipeline.paths import FINAL, RunPaths

_DATA = ["data.name", "data.path", "data.follow_symlinks", "data.checksums"]
# what a run does between its steps: the range test sets each step's rate itself (keeping a pretrained backbone's
# ratio to train.lr) and runs no epochs
_NOT_IN_A_STEP = {"train.epochs", "train.scheduler", "train.step_size", "train.gamma",
                  "train.monitor", "train.monitor_window", "train.patience"}
PARAMS: dict[str, list[str]] = {
    "download": _DATA,
    "prepare": [*_DATA, "data.image_size", "data.channels", "data.skip_bad_images", "data.memory_limit_mb",
                "data.val_fraction", "data.test_fraction", "data.split_seed"],
    "train": [key for key in training_keys() if key != "model.name"],  # train@<model> sets the name
    # the range test of the model the search tunes: the model, how it trains a step, the sweep
    "lr_find": ["seed", "data.augment", "model", *(key for key in training_keys() if key.startswith("train.")
                                                   and key not in _NOT_IN_A_STEP), "lr_find"],
    # the study name holds data.name; CPU threads set the order of sums, which bf16 numbers show
    "tune": [*search_keys(), "data.name", "train.threads"],
    "train_final": training_keys(),
    # which runs are evaluated, how their reports are titled, where and with how many threads they compute, and
    # the seed of the intervals' bootstrap
    "evaluate": ["seed", "comparison", "data.name", "train.device", "train.threads"],
    # the seed of the paired comparisons' bootstrap
    "report": ["seed", "comparison", "data.name"],
}


def run_label(run_name: str, model_name: str) -> str:
    """How reports name a run: the final one says which model it is (as trained, whatever params say now)."""
    return f"{run_name} ({model_name})" if run_name == FINAL else run_name


def evaluated_runs(cfg: Config) -> list[str]:
    return [*cfg.comparison, FINAL]


def download(cfg: Config) -> None:
    """Fetch raw files (torchvision datasets, MD5-verified) or record what a bundled/local dataset holds."""
    from pipeline import datasets  # the registry alone: the bundled digits' download imports no torch

    print(datasets.fetch(cfg.data, paths.raw_dir(cfg.data.name), paths.own_copies(cfg.data.name)))


def prepare(cfg: Config) -> None:
    """Decode once into uint8 tensors with a seeded, stratified train/val(/test) split, plus a sample grid.

    Data within data.memory_limit_mb stays resident (one tensor, on the training device); larger data is streamed
    from a memory-mapped file (a folder's images are decoded straight into it, never all held in memory).
    """
    import torch

    from pipeline import data, datasets, files, reporting
    from pipeline.datasets import folders

    root, out = paths.raw_dir(cfg.data.name), paths.PREPARED_DIR
    limit = cfg.data.memory_limit_mb * 2 ** 20
    with contextlib.ExitStack() as stack:
        # A streamed dataset's images go to a temporary file that replaces images.u8 only once the splits and
        # their files are written: a bad image or a split error leaves the previous prepared data whole.
        def images_file() -> Path:
            return stack.enter_context(files.atomic_path(out / data.IMAGES_FILE))

        listing = folders.scan_folder(Path(cfg.data.path), cfg.data.follow_symlinks) \
            if datasets.KINDS[cfg.data.name].folder else None
        if listing and folders.folder_bytes(listing, cfg.data) > limit:
            images_path = images_file()
            with open(images_path, "wb") as stream:
                raw = datasets.load(cfg.data, root, out=stream, listing=listing)
        else:
            raw = datasets.load(cfg.data, root, listing=listing)
            parts = [part for part in (raw.train_images, raw.val_images, raw.test_images) if part is not None]
            images_path = images_file() if sum(part.numel() for part in parts) > limit else None
            if images_path:  # a downloaded dataset fits in memory while prepared, not beside training
                with open(images_path, "wb") as stream:
                    for part in parts:
                        stream.write(part.contiguous().numpy().tobytes())
        splits = data.splits_of(raw, cfg.data, cfg.data.split_seed, images_path)
        meta = data.save_prepared(out, splits, raw.classes, source=raw.source, images_path=images_path)
    samples, first = splits["train"], torch.arange(min(9, len(splits["train"])))
    reporting.plot_samples(samples.take(first), [raw.classes[i] for i in samples.labels[first].tolist()],
                           paths.SAMPLES_PNG, title=f"{cfg.data.name}: training samples")
    how = "streamed from disk (above" if images_path else "resident (within"
    print(f"prepared {cfg.data.name}: {meta['sizes']} images of shape {meta['shape']}, {how} "
          f"data.memory_limit_mb={cfg.data.memory_limit_mb:g}) -> {out}")


def train(cfg: Config, run_name: str, run_paths: RunPaths | None = None) -> str | None:
    """Train `cfg.model.name` with the shared loop, once per seed replicate; write the models, the shipped one's
    history and the metrics.

    The `replicates` (seeds seed, seed+1, ...) train together as one population
    (`pipeline.population`); the best on validation ships as the model. Each is
    its own MLflow run, nested under the model's run. An interrupted run resumes
    from its own resume points (same config, data and code) and continues its
    own MLflow runs; a finished run is never resumed. Started by torchrun
    (`train --nproc N`), every rank trains (the replicates one after another)
    and rank 0 alone writes, logs and tracks. Returns the model's MLflow run id
    (None with tracking off).
    """
    from pipeline import data, devices, distributed, loop, training

    training.log_seconds()  # a bad PIPELINE_LOG_SECONDS fails before anything starts
    run_paths = run_paths or RunPaths.of(run_name)
    prepared = data.load_prepared(paths.PREPARED_DIR)
    world, device = distributed.init(devices.resolve_device(cfg.train.device))
    threads = devices.set_threads(cfg.train.threads, world.size)  # ranks on one machine share its cores
    try:
        several, family = cfg.replicates > 1, training.resume_key(cfg, prepared.md5)
        runs = []
        for member, key in zip(training.replicate_configs(cfg), training.resume_keys(cfg, prepared.md5)):
            model, train_batches, val_batches = training.setup(member, prepared, device, world)
            checkpoints = loop.Checkpoints(run_paths.checkpoints, key, writer=world.is_main, family=family)
            runs.append(loop.Run(model, member.train, train_batches, val_batches, checkpoints=checkpoints,
                                 key=member))
        if not world.is_main:  # the other ranks train their slices, and that is all
            for run in runs:
                loop.fit_run(run, device, world)
            return None
        from pipeline import models

        ranks = f" x {world.size} processes" if world.distributed else ""
        on = f"{device} ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else str(device)
        seeds = f", seeds {cfg.seed}-{cfg.seed + cfg.replicates - 1}" if several else ""
        print(f"[{run_name}] {cfg.model.name}: {models.count_parameters(runs[0].model):,} parameters on {on}{ranks}, "
              f"{len(prepared.train)} train / {len(prepared.val)} val images{seeds}", flush=True)
        name = cfg.model.name if run_name == cfg.model.name else f"{cfg.model.name}-{run_name}"
        with contextlib.ExitStack() as tracked:
            parent, own_runs = _track_replicates(cfg, run_name, name, runs, prepared, tracked)
            if several and not world.distributed:
                from pipeline import population

                population.fit_together(runs, device)
                if failed := next((run.error for run in runs if run.error is not None), None):
                    raise failed
            else:
                for run in runs:
                    loop.fit_run(run, device, world)
            results = [run.result for run in runs]
            ships = training.shipped(cfg, results)
            summary = _write_training_outputs(cfg, run_name, run_paths, runs, ships, prepared)
            if parent:
                _log_training(cfg, parent, own_runs, run_name, run_paths, summary, runs, ships, prepared, world)
        for run in runs:
            run.checkpoints.clear()  # the outputs exist: this run is finished and must not be resumed
    finally:
        distributed.shutdown(world)
    best = results[ships].best
    which = f" (seed {cfg.seed + ships}, the best of {cfg.replicates} on {cfg.train.monitor})" if several else ""
    print(f"[{run_name}] ships epoch {results[ships].best_epoch}: val_accuracy {best.val_accuracy:.4f} "
          f"val_loss {best.val_loss:.4f} -> {run_paths.model}{which}")
    return parent.run_id if parent else None


def _track_replicates(cfg, run_name, name, runs, prepared, tracked: contextlib.ExitStack):
    """The model's MLflow run (None with tracking off) and each replicate's: with several, one nested run each,
    else the model's own. A resumed run continues its own. Gives each run its callbacks (the console, its MLflow
    curves, its TensorBoard folder)."""
    import torch

    from pipeline import board, training

    data_md5, several = prepared.md5, len(runs) > 1
    images = prepared.train.take(torch.arange(min(32, len(prepared.train)))) \
        if cfg.tracking.tensorboard else None  # TensorBoard's look at the inputs
    resumed = [run.checkpoints.load() if cfg.train.resume else None for run in runs]
    continued = next((run.checkpoints.meta.get("mlflow_parent_run_id") for run, state in zip(runs, resumed)
                      if state), None)
    parent = tracked.enter_context(training.tracked_run(
        cfg, f"{name}-{cfg.fingerprint()}", run_name, data_md5, tags={"pipeline.level": "model"},
        continue_run_id=continued if several else (resumed[0] and runs[0].checkpoints.meta.get("mlflow_run_id"))))
    own_runs = []
    for index, (run, state) in enumerate(zip(runs, resumed)):
        member = run.key
        own = parent
        label = f"{name}-seed{member.seed}-{cfg.fingerprint()}" if several else f"{name}-{cfg.fingerprint()}"
        if parent and several:
            own = tracked.enter_context(training.tracked_run(
                member, label, run_name, data_md5,
                continue_run_id=state and run.checkpoints.meta.get("mlflow_run_id"), parent_run_id=parent.run_id,
                tags={"pipeline.level": "replicate", "replicate.index": str(index),
                      "replicate.seed": str(member.seed)}))
        if own:
            run.checkpoints.meta |= {"mlflow_run_id": own.run_id, "mlflow_parent_run_id": parent.run_id}
        shown = f"{run_name} seed {member.seed}" if several else run_name
        run.callbacks = [training.ConsoleLog(shown, cfg.train.epochs)] + ([own.metrics] if own else []) + (
            [board.TensorBoard(board.run_dir(cfg, label), member, images)] if cfg.tracking.tensorboard else [])
        own_runs.append(own)
    return parent, own_runs


def _write_training_outputs(cfg, run_name, run_paths, runs, ships, prepared) -> dict:
    """Every replicate's model file, the shipped one's copy as the model, its history.csv, metrics.json (with
    the replicates' spread) and curves.png (every replicate's); returns the summary."""
    from pipeline import files, metrics, models, reporting, training

    mean, std = models.input_stats(cfg.model, prepared.mean, prepared.std)
    several = len(runs) > 1
    for index, run in enumerate(runs):
        member = run.key
        info = {"replicate": {"seed": member.seed, "index": index, "of": len(runs), "ships": index == ships,
                              "chosen_on": cfg.train.monitor}} if several else {}
        models.save_model(run_paths.replicate_model(member.seed) if several else run_paths.model,
                          run.result.best_state, member, prepared.classes, prepared.input_shape, mean, std,
                          run_name=run_name, best_epoch=run.result.best_epoch, data_md5=prepared.md5, **info)
    if several:
        files.copy_file(run_paths.replicate_model(cfg.seed + ships), run_paths.model)
    summary = training.summary(cfg, [run.result for run in runs], ships, runs[ships].model)
    files.write_csv(run_paths.history, metrics.HISTORY_COLUMNS, map(metrics.history_row, runs[ships].result.history))
    files.write_json(run_paths.metrics, summary)
    reporting.plot_curves({f"seed {run.key.seed}" if several else run_name: run.result.history for run in runs},
                          run_paths.curves)
    return summary


def _log_training(cfg, parent, own_runs, run_name, run_paths, summary, runs, ships, prepared, world) -> None:
    """What MLflow gets beyond the per-epoch curves: the best epoch's values (and with several replicates their
    spread on the model's run and each replicate's own on its run), facts as tags, files, the shipped model."""
    import torch

    from pipeline import files, models

    shipped = runs[ships]
    best = shipped.result.best
    several = len(runs) > 1
    common = {"distributed.world_size": world.size, "torch.threads": torch.get_num_threads()}
    for index, (run, own) in enumerate(zip(runs, own_runs) if several else []):
        result = run.result
        own.log_metrics({"best_val_loss": result.best.val_loss, "best_val_accuracy": result.best.val_accuracy})
        own.set_tags({"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                      "stopped_early": result.stopped_early, "replicate.ships": index == ships,
                      "train_seconds": f"{result.seconds:.1f}", "tracking_seconds": f"{own.metrics.seconds_spent:.2f}",
                      **common, "model.md5": files.file_digest(run_paths.replicate_model(run.key.seed))})
        own.log_config()
    spread = {f"best_{key}": summary[key] for key in ("val_loss_mean", "val_loss_std", "val_accuracy_mean",
                                                      "val_accuracy_std")} if several else {}
    if several:  # the model's run shows the curves of the replicate it ships
        for metrics in shipped.result.history:
            parent.metrics.on_epoch_end(metrics)
        parent.metrics.flush()
    parent.log_metrics({"best_val_loss": best.val_loss, "best_val_accuracy": best.val_accuracy, **spread})
    weights_sha256 = getattr(shipped.model, "weights_sha256", None)
    parent.set_tags({"best_epoch": shipped.result.best_epoch, "epochs_run": summary["epochs_run"],
                     "stopped_early": shipped.result.stopped_early, "model.parameters": summary["parameters"],
                     "replicates": len(runs), "replicate.seeds": ",".join(str(run.key.seed) for run in runs),
                     "replicate.shipped_seed": shipped.key.seed,
                     "train_seconds": f"{max(run.result.seconds for run in runs):.1f}",
                     **({} if several else {"tracking_seconds": f"{parent.metrics.seconds_spent:.2f}"}), **common,
                     # which pretrained file training started from (model.weights names it; this is its content)
                     **({"model.weights_sha256": weights_sha256} if weights_sha256 else {})})
    parent.log_config()
    parent.log_artifacts(run_paths.history, run_paths.curves, run_paths.metrics)
    if cfg.tracking.log_models:
        classifier = models.load_classifier(run_paths.model)
        example = prepared.val.images[:2].float().div(255).numpy()
        with torch.inference_mode():
            probabilities = classifier(torch.from_numpy(example)).numpy()
        registered = f"{cfg.data.name}-{cfg.model.name}" if run_name == FINAL else None
        parent.log_model(run_paths.model, example, probabilities, registered,
                         selection={"val_loss": best.val_loss, "val_accuracy": best.val_accuracy})


def lr_find(cfg: Config) -> None:
    """The learning-rate range test for model.name, with its optimizer, batch size and data (lr_find.*): the curve,
    its plot and the suggestion -> reports/lr_find/<model>/, and the same as an MLflow run."""
    from pipeline import data, devices, files, loop, lr_finder, reporting, training

    prepared = data.load_prepared(paths.PREPARED_DIR)
    device = devices.resolve_device(cfg.train.device)
    devices.set_threads(cfg.train.threads, 1)
    model, train_batches, _ = training.setup(cfg, prepared, device)
    sweep = cfg.lr_find
    test = lr_finder.range_test(loop.Run(model, cfg.train, train_batches, []), device, sweep.min_lr, sweep.max_lr,
                                sweep.steps)
    reading = test.summary()
    low, high = reading["usable"]
    out, name = paths.lr_find_dir(cfg.model.name), cfg.model.name
    files.write_csv(out / paths.LR_CURVE, ["lr", "loss"], zip(test.lrs, test.losses))
    reporting.plot_lr_range(*test.window(), reading["steepest"], reading["usable"], out / paths.LR_PLOT,
                            f"{name}, {cfg.train.optimizer}, batch {cfg.train.batch_size}: range test")
    files.write_json(out / paths.LR_SUGGESTION, {
        "model": name, "optimizer": cfg.train.optimizer, "batch_size": cfg.train.batch_size,
        "min_lr": sweep.min_lr, "max_lr": sweep.max_lr, **reading, "data.md5": prepared.md5})
    if cfg.tracking.enabled:
        from pipeline import tracking

        tracking.log_lr_find(cfg, f"lr_find-{name}", prepared.md5, test.lrs, test.losses, reading, out)
    how = "until the loss diverged" if test.stopped_early else f"up to {sweep.max_lr:g}"
    print(f"[lr-find] {name}: the loss falls fastest at lr {reading['steepest']:.2e}; usable {low:.2e} .. {high:.2e} "
          f"({len(test.lrs)} steps from {sweep.min_lr:g} {how}) -> {out}/\n"
          f"  to search a decade either side of it: dvc exp run -S tune.lr_from_finder=true")


def lr_from_finder(cfg: Config, say: bool = True) -> Config:
    """cfg searching train.lr a decade either side of the range test's suggestion for model.name (log scale):
    tune.lr_from_finder. The study is named by the space it searches, so a new suggestion is a new study."""
    from pipeline import files

    path = paths.lr_find_dir(cfg.model.name) / paths.LR_SUGGESTION
    record = files.read_json(path, "run `python -m pipeline lr-find` (or `dvc repro lr_find`) to write it, or set "
                                   "tune.lr_from_finder to false")
    steepest = record.get("steepest") if isinstance(record, dict) else None
    if not (isinstance(steepest, float) and steepest > 0 and record.get("model") == cfg.model.name):
        raise UserError(f"{path} is not a range test of {cfg.model.name}: run `python -m pipeline lr-find` (or "
                        "`dvc repro lr_find`) to write it")
    low, high = steepest / 10, steepest * 10
    if say:
        print(f"[tune] train.lr searched in {low:.2e} .. {high:.2e}, a decade either side of the range test's "
              f"suggestion ({path})", flush=True)
    space = {**cfg.model_dump()["tune"]["space"], "train.lr": {"low": low, "high": high, "log": True}}
    return cfg.with_overrides({"tune.space": space}, source=str(path))


def tune(cfg: Config, worker_args: list[str], worker: bool = False) -> None:
    """Optuna search over tune.space for model.name -> reports/tune/ (best_params.json, trials, plots)."""
    from pipeline import devices, tuning

    if cfg.tune.lr_from_finder:
        cfg = lr_from_finder(cfg, say=not worker)
    devices.set_threads(cfg.train.threads, cfg.tune.workers if worker else 1)  # workers share the cores
    if worker:
        tuning.work(cfg, paths.PREPARED_DIR)
    else:
        tuning.tune(cfg, paths.PREPARED_DIR, worker_args)


def tuned(cfg: Config, best_params: Path) -> Config:
    """cfg with the winning values of a search (reports/tune/best_params.json) applied."""
    from pipeline import files

    record = files.read_json(best_params, "run `python -m pipeline tune` (or `dvc repro tune`) to write it")
    try:
        print(f"[final] trains with trial {record['trial']}'s params (study {record['study']}, {best_params})")
        return cfg.with_overrides(record["params"])
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{best_params} is not a search's best-params record; run `dvc repro -f tune` to "
                        "write it again") from None


def _tuning_line(search: dict) -> str:
    """Where the final model's params come from: the trial the search shipped, and (with `tune.confirm`) whether it
    beat the untuned settings on validation beyond the seeds' noise, with the difference's interval."""
    confirmation = search.get("confirmation")
    if not confirmation:
        return (f"Tuning: `final` trains with trial {search['trial']}'s params, the search's best on one seed per "
                "trial (no confirmation over seeds: tune.confirm 0 or replicates 1).")
    seeds = ", ".join(str(seed) for seed in confirmation["seeds"])
    return f"Tuning, on validation over seeds {seeds}: {confirmation['why']}; `final` trains with trial " \
           f"{confirmation['shipped']}'s params."


def evaluate(cfg: Config) -> None:
    """Test-set predictions of every trained model (and each of its seed replicates) -> scikit-learn metrics with
    intervals, the replicates' mean and std, and the predictions `report` and `compare` pair up."""
    import numpy as np

    from pipeline import data, devices, evaluation, files, reporting
    from pipeline.comparison import Predictions

    prepared = data.load_prepared(paths.PREPARED_DIR)
    device = devices.resolve_device(cfg.train.device)
    devices.set_threads(cfg.train.threads)
    for run_name in evaluated_runs(cfg):
        run_paths = RunPaths.of(run_name)
        model_files, shipped = _replicate_files(run_paths)
        tested = [predict_test_set(path, prepared, device, cfg.data.loader_workers) for path in model_files]
        y_true, probabilities, saved = tested[shipped]
        model_name = saved["config"]["model"]["name"]
        predictions = Predictions(run_name, y_true, np.stack([probs for _, probs, _ in tested]),
                                  np.array([each["config"]["seed"] for _, _, each in tested]), shipped, prepared.md5,
                                  tuple(prepared.classes))
        per_seed = []
        for predicted in predictions.predicted:
            matrix = evaluation.confusion(y_true, predicted, prepared.num_classes)
            per_seed.append(evaluation.with_intervals(evaluation.classification_metrics(y_true, predicted), matrix,
                                                      cfg.seed))
        metrics, y_pred = per_seed[shipped], predictions.predicted[shipped]
        spread = evaluation.spread(per_seed, predictions.seeds.tolist(), int(predictions.seeds[shipped]))
        text, as_dict = evaluation.report(y_true, y_pred, prepared.classes)
        matrix = evaluation.confusion(y_true, y_pred, prepared.num_classes)

        out = paths.eval_dir(run_name)
        files.write_json(out / "metrics.json", metrics)
        files.write_json(out / paths.REPLICATES_JSON, spread)
        predictions.save(out / paths.PREDICTIONS)
        files.write_text(out / "classification_report.txt", text)
        files.write_json(out / "classification_report.json", as_dict)
        files.write_csv(out / "confusion_matrix.csv", ["actual\\predicted", *prepared.classes],
                        [[name, *row] for name, row in zip(prepared.classes, matrix.tolist())])
        files.write_csv(out / "predictions.csv", ["actual", "predicted"],
                        [(prepared.classes[t], prepared.classes[p]) for t, p in zip(y_true, y_pred)])
        reporting.plot_confusion(matrix, prepared.classes, out / "confusion_matrix.png",
                                 title=f"{run_label(run_name, model_name)} on {cfg.data.name}: "
                                       f"accuracy {metrics['accuracy']:.4f}")
        if cfg.tracking.tensorboard:
            from pipeline import board

            board.add_pictures(board.run_dir(cfg, f"evaluate-{run_name}"), {
                "test/confusion_matrix": out / "confusion_matrix.png", "train/curves": run_paths.curves})
        if cfg.tracking.enabled:
            from pipeline import tracking

            tracking.log_test_results(cfg, run_name, run_paths.model, {**metrics, **evaluation.spread_metrics(spread)},
                                      [out / name for name in ("confusion_matrix.png", "confusion_matrix.csv",
                                                               "classification_report.txt",
                                                               "classification_report.json", paths.PREDICTIONS)])
            for path, each in zip(model_files if len(model_files) > 1 else [], per_seed):
                tracking.log_test_results(cfg, run_name, path, each, [], level="replicate")
        over = f"; over {len(per_seed)} seeds {evaluation.shown_spread(spread, 'accuracy')}" \
            if len(per_seed) > 1 else ""
        print(f"[{run_name}] test accuracy {evaluation.shown(metrics, 'accuracy')} "
              f"f1_macro {evaluation.shown(metrics, 'f1_macro')} on {metrics['images']} images{over}")


def _replicate_files(run_paths: RunPaths) -> tuple[list[Path], int]:
    """The model files of a run's seed replicates and which of them ships: the model file itself where it says
    it is one of several (a replicate's file that is not what the model file says it is, is refused)."""
    from pipeline import files, models

    _, saved = models.load_model(run_paths.model)
    replicate = saved.get("replicate")
    if not replicate:
        return [run_paths.model], 0
    found = run_paths.replicate_models()
    try:
        seeds = [saved["config"]["seed"] - replicate["index"] + i for i in range(replicate["of"])]
        expected = [run_paths.replicate_model(seed) for seed in seeds]
        whole = found == expected and \
            files.file_digest(expected[replicate["index"]]) == files.file_digest(run_paths.model)
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{run_paths.model} holds no readable replicate record: train it again (`dvc repro -f "
                        f"{_stage_of(run_paths.history)}`)") from None
    if not whole:
        raise UserError(f"{run_paths.model_dir} does not hold the {replicate['of']} seed replicates its model.pt "
                        f"says it is one of (seeds {seeds[0]}-{seeds[-1]}): train it again (`dvc repro -f "
                        f"{_stage_of(run_paths.history)}`)")
    return [run_paths.model if i == replicate["index"] else path for i, path in enumerate(expected)], \
        replicate["index"]


def predict_test_set(model_file: Path, prepared, device, workers: int = 0):
    """(true labels, class probabilities, the model file's payload) on the test split, as numpy arrays."""
    from pipeline import data, loop, models

    model, saved = models.load_model(model_file)
    if saved["classes"] != prepared.classes or tuple(saved["input_shape"]) != prepared.input_shape:
        raise UserError(f"{model_file} was trained on other data ({len(saved['classes'])} classes, input "
                        f"{tuple(saved['input_shape'])}) than {paths.PREPARED_DIR}: run `dvc repro` to retrain it")
    batches = data.eval_batches(prepared.test, saved["mean"], saved["std"], device, workers=workers)
    labels, probs = loop.predict(model, batches, device)
    return labels.numpy(), probs.numpy(), saved


def _read_history(path: Path) -> list:
    """A run's history.csv as EpochMetrics; a file that holds no epochs, or something else than numbers, is one
    line naming it (a report silently missing a run's curves would look whole)."""
    from pipeline import files, metrics

    remedy = f"run its train stage again (`dvc repro -f {_stage_of(path)}`)"
    try:
        history = [metrics.from_history_row(row) for row in files.read_csv(path, remedy)]
    except (KeyError, ValueError, TypeError) as err:
        reason = f"no column {err}" if isinstance(err, KeyError) else str(err)
        raise UserError(f"{path} is corrupt ({reason}): {remedy}") from None
    if not history:
        raise UserError(f"{path} holds no epochs: {remedy}")
    return history


def _stage_of(history: Path) -> str:
    run = history.parent.name
    return "train_final" if run == FINAL else f"train@{run}"


def report(cfg: Config, tuned: Path | None = None) -> None:
    """reports/metrics.json for the final model, compare.md across models (each with its interval and its spread
    over seeds, then every pair compared on the same test images; with `tuned`, the search the final model's params
    came from), DVC plots and PNGs."""
    from pipeline import comparison, files, reporting
    from pipeline.comparison import Predictions
    from pipeline.evaluation import KEYS, LEVEL, METRIC_KEYS, RESAMPLES, shown, shown_spread, spread_metrics

    runs = evaluated_runs(cfg)
    remedy = "run the train and evaluate stages first (`dvc repro`)"
    test = {run: files.read_json(paths.eval_dir(run) / "metrics.json", remedy) for run in runs}
    seeds = {run: files.read_json(paths.eval_dir(run) / paths.REPLICATES_JSON, remedy) for run in runs}
    fit = {run: files.read_json(RunPaths.of(run).metrics, remedy) for run in runs}
    # every input read and checked before anything is written: a bad one leaves every output as it was
    histories = {run: _read_history(RunPaths.of(run).history) for run in runs}
    search = files.read_json(tuned, "run the tune stage first (`dvc repro tune`)") if tuned else None
    try:
        tuning = f"{_tuning_line(search)}\n\n" if search else ""
        labels = {run: run_label(run, fit[run]["model"]) for run in runs}
        predictions = [Predictions.load(paths.eval_dir(run) / paths.PREDICTIONS, labels[run], remedy) for run in runs]
        rows = [[labels[run], *(shown(test[run], key) for key in METRIC_KEYS), seeds[run]["replicates"],
                 *(shown_spread(seeds[run], key) for key in comparison.COMPARED),
                 f"{fit[run]['parameters']:,}", fit[run]["best_epoch"]] for run in runs]
        final = {key: test[FINAL][key] for key in KEYS} | spread_metrics(seeds[FINAL]) \
            | {"replicates": seeds[FINAL]["replicates"]}
        # each model's headline numbers, keyed by model, so `dvc metrics diff` and `dvc exp show` show them in
        # short columns (logreg.accuracy, ...); compare.md has the rest
        models = {run: {key: test[run][key] for key in ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
                                                          "f1_macro")} | {"accuracy_mean": seeds[run]["accuracy_mean"]}
                  for run in runs}
    except (KeyError, TypeError) as err:
        raise UserError(f"reports/eval, reports/train or {tuned or 'reports/tune'} hold files of another version "
                        f"(no {err}); run `dvc repro -f tune evaluate` and the train stages again") from None
    pairs = comparison.compare(predictions, cfg.seed)
    header = ["model", *(key.replace("_", " ") for key in METRIC_KEYS), "seeds",
              *(f"{key.replace('_', ' ')} over seeds" for key in comparison.COMPARED), "parameters", "epoch shipped"]
    how = (f"Each value is the shipped model's (the best of its seeds on validation), with its {LEVEL:.0%} "
           f"interval [low, high]: a seeded bootstrap over the {final['images']} test images ({RESAMPLES:,} "
           "resamples), how far another test set of this size could move it. The columns over seeds give the mean "
           "± standard deviation of every seed replicate: how far the training seed alone moves it.")
    paired = ("Each pair on the same test images. Δ: the difference of the means over seeds, with a paired "
              "bootstrap interval that resamples the images (the same for both) and the seeds. McNemar's exact "
              "test on the shipped models' discordant images, Holm-corrected for the number of pairs in brackets. "
              "A verdict of \"better\" needs both; otherwise the difference is within what this test set and the "
              "seeds can move, and ± says the smallest difference it could resolve.")
    files.write_text(paths.COMPARE_MD, f"# Test-set comparison on {cfg.data.name}\n\n"
                     + comparison.best_line(predictions, pairs) + f"\n\n{tuning}"
                     + reporting.markdown_table(header, rows) + f"\n{how}\n\n## Is A better than B?\n\n"
                     + reporting.markdown_table(comparison.TABLE_HEADER, comparison.table_rows(pairs))
                     + f"\n{paired}\n")
    files.write_json(paths.METRICS_JSON, final)
    files.write_json(paths.MODELS_JSON, models)

    # the final model's predictions and confusion matrix as `evaluate` wrote them, where DVC's plots expect them
    files.copy_file(paths.eval_dir(FINAL) / "predictions.csv", paths.PLOTS_DIR / "confusion.csv")
    files.copy_file(paths.eval_dir(FINAL) / "confusion_matrix.png", paths.PLOTS_DIR / "confusion.png")
    reporting.plot_curves(histories, paths.PLOTS_DIR / "curves.png")
    files.write_csv(paths.PLOTS_DIR / "curves.csv", reporting.LONG_CURVE_COLUMNS, reporting.long_curve_rows(histories))
    print(f"final model ({fit[FINAL]['model']}): " + ", ".join(f"{k} {shown(final, k)}" for k in METRIC_KEYS))
    print(comparison.best_line(predictions, pairs).replace("**", ""))  # the tuning line: tune said it
