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
PARAMS: dict[str, list[str]] = {
    "download": _DATA,
    "prepare": [*_DATA, "data.image_size", "data.channels", "data.skip_bad_images", "data.memory_limit_mb",
                "data.val_fraction", "data.test_fraction", "data.split_seed"],
    "train": [key for key in training_keys() if key != "model.name"],  # train@<model> sets the name
    # the study name holds data.name; CPU threads set the order of sums, which bf16 numbers show
    "tune": [*search_keys(), "data.name", "train.threads"],
    "train_final": training_keys(),
    # which runs are evaluated, how their reports are titled, where and with how many threads they compute, and
    # the seed of the intervals' bootstrap
    "evaluate": ["seed", "comparison", "data.name", "train.device", "train.threads"],
    "report": ["comparison", "data.name"],
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
    """Train `cfg.model.name` with the shared loop; write the model, its history and metrics.

    An interrupted run resumes from its own resume point (same config, data and
    code) and continues its own MLflow run; a finished run is never resumed.
    Started by torchrun (`train --nproc N`), every rank trains and rank 0 alone
    writes, logs and tracks. Returns the MLflow run id (None with tracking off).
    """
    from pipeline import data, devices, distributed, loop, training

    run_paths = run_paths or RunPaths.of(run_name)
    prepared = data.load_prepared(paths.PREPARED_DIR)
    world, device = distributed.init(devices.resolve_device(cfg.train.device))
    threads = devices.set_threads(cfg.train.threads, world.size)  # ranks on one machine share its cores
    try:
        model, train_batches, val_batches = training.setup(cfg, prepared, device, world)
        checkpoints = loop.Checkpoints(run_paths.checkpoints, training.resume_key(cfg, prepared.md5),
                                       writer=world.is_main)
        resumed = checkpoints.load() if cfg.train.resume else None
        if not world.is_main:  # the other ranks train their slices, and that is all
            loop.fit(model, train_batches, val_batches, cfg.train, device, (), checkpoints, world)
            return None
        from pipeline import models

        ranks = f" x {world.size} processes" if world.distributed else ""
        on = f"{device} ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else str(device)
        print(f"[{run_name}] {cfg.model.name}: {models.count_parameters(model):,} parameters on {on}{ranks}, "
              f"{len(prepared.train)} train / {len(prepared.val)} val images", flush=True)
        name = cfg.model.name if run_name == cfg.model.name else f"{cfg.model.name}-{run_name}"
        continued = checkpoints.meta.get("mlflow_run_id") if resumed else None
        with training.tracked_run(cfg, f"{name}-{cfg.fingerprint()}", run_name, prepared.md5,
                                  continue_run_id=continued) as run:
            if run:
                checkpoints.meta["mlflow_run_id"] = run.run_id
            callbacks = [loop.ConsoleLog(run_name, cfg.train.epochs)] + ([run.metrics] if run else [])
            result = loop.fit(model, train_batches, val_batches, cfg.train, device, callbacks, checkpoints, world)
            summary = _write_training_outputs(cfg, run_name, run_paths, result, model, prepared)
            if run:
                _log_training(cfg, run, run_name, run_paths, summary, result, prepared, world,
                              getattr(model, "weights_sha256", None))
        checkpoints.clear()  # the outputs exist: this run is finished and must not be resumed
    finally:
        distributed.shutdown(world)
    best = result.best
    print(f"[{run_name}] best epoch {result.best_epoch}: val_accuracy {best.val_accuracy:.4f} "
          f"val_loss {best.val_loss:.4f} -> {run_paths.model}")
    return run.run_id if run else None


def _write_training_outputs(cfg, run_name, run_paths, result, model, prepared) -> dict:
    """The model file, history.csv, metrics.json and curves.png of a finished run; returns the summary."""
    from pipeline import files, metrics, models, reporting, training

    mean, std = models.input_stats(cfg.model, prepared.mean, prepared.std)
    models.save_model(run_paths.model, result.best_state, cfg, prepared.classes, prepared.input_shape,
                      mean, std, run_name=run_name, best_epoch=result.best_epoch,
                      data_md5=prepared.md5)
    summary = training.summary(cfg, result, model)
    files.write_csv(run_paths.history, metrics.HISTORY_COLUMNS, map(metrics.history_row, result.history))
    files.write_json(run_paths.metrics, summary)
    reporting.plot_curves({run_name: result.history}, run_paths.curves)
    return summary


def _log_training(cfg, run, run_name, run_paths, summary, result, prepared, world, weights_sha256) -> None:
    """What MLflow gets beyond the per-epoch curves: the best epoch's values, facts as tags, files, the model."""
    import torch

    from pipeline import models

    best = result.best
    run.log_metrics({"best_val_loss": best.val_loss, "best_val_accuracy": best.val_accuracy})
    run.set_tags({"best_epoch": result.best_epoch, "epochs_run": summary["epochs_run"],
                  "stopped_early": result.stopped_early, "model.parameters": summary["parameters"],
                  "train_seconds": f"{result.seconds:.1f}", "tracking_seconds": f"{run.metrics.seconds_spent:.2f}",
                  "distributed.world_size": world.size, "torch.threads": torch.get_num_threads(),
                  # which pretrained file training started from (model.weights names it; this is its content)
                  **({"model.weights_sha256": weights_sha256} if weights_sha256 else {})})
    run.log_config()
    run.log_artifacts(run_paths.history, run_paths.curves, run_paths.metrics)
    if cfg.tracking.log_models:
        classifier = models.load_classifier(run_paths.model)
        example = prepared.val.images[:2].float().div(255).numpy()
        with torch.inference_mode():
            probabilities = classifier(torch.from_numpy(example)).numpy()
        registered = f"{cfg.data.name}-{cfg.model.name}" if run_name == FINAL else None
        run.log_model(run_paths.model, example, probabilities, registered,
                      selection={"val_loss": best.val_loss, "val_accuracy": best.val_accuracy})


def tune(cfg: Config, worker_args: list[str], worker: bool = False) -> None:
    """Optuna search over tune.space for model.name -> reports/tune/ (best_params.json, trials, plots)."""
    from pipeline import devices, tuning

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
        print(f"[final] using trial {record['trial']} of study {record['study']}: {record['params']}")
        return cfg.with_overrides(record["params"])
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{best_params} is not a search's best-params record; run `dvc repro -f tune` to "
                        "write it again") from None


def evaluate(cfg: Config) -> None:
    """Test-set predictions of every trained model -> scikit-learn metrics and reports."""
    from pipeline import data, devices, evaluation, files, reporting

    prepared = data.load_prepared(paths.PREPARED_DIR)
    device = devices.resolve_device(cfg.train.device)
    devices.set_threads(cfg.train.threads)
    for run_name in evaluated_runs(cfg):
        model_file = RunPaths.of(run_name).model
        y_true, y_pred, model_name = predict_test_set(model_file, prepared, device, cfg.data.loader_workers)
        text, as_dict = evaluation.report(y_true, y_pred, prepared.classes)
        matrix = evaluation.confusion(y_true, y_pred, prepared.num_classes)
        metrics = evaluation.with_intervals(evaluation.classification_metrics(y_true, y_pred), matrix, cfg.seed)

        out = paths.eval_dir(run_name)
        files.write_json(out / "metrics.json", metrics)
        files.write_text(out / "classification_report.txt", text)
        files.write_json(out / "classification_report.json", as_dict)
        files.write_csv(out / "confusion_matrix.csv", ["actual\\predicted", *prepared.classes],
                        [[name, *row] for name, row in zip(prepared.classes, matrix.tolist())])
        files.write_csv(out / "predictions.csv", ["actual", "predicted"],
                        [(prepared.classes[t], prepared.classes[p]) for t, p in zip(y_true, y_pred)])
        reporting.plot_confusion(matrix, prepared.classes, out / "confusion_matrix.png",
                                 title=f"{run_label(run_name, model_name)} on {cfg.data.name}: "
                                       f"accuracy {metrics['accuracy']:.4f}")
        if cfg.tracking.enabled:
            from pipeline import tracking

            tracking.log_test_results(cfg, run_name, model_file, metrics, [
                out / name for name in ("confusion_matrix.png", "confusion_matrix.csv", "classification_report.txt",
                                        "classification_report.json")])
        print(f"[{run_name}] test accuracy {evaluation.shown(metrics, 'accuracy')} "
              f"f1_macro {evaluation.shown(metrics, 'f1_macro')} on {metrics['images']} images")


def predict_test_set(model_file: Path, prepared, device, workers: int = 0):
    """(true labels, predicted labels, the model's name) on the test split, labels as numpy arrays."""
    from pipeline import data, loop, models

    model, saved = models.load_model(model_file)
    if saved["classes"] != prepared.classes or tuple(saved["input_shape"]) != prepared.input_shape:
        raise UserError(f"{model_file} was trained on other data ({len(saved['classes'])} classes, input "
                        f"{tuple(saved['input_shape'])}) than {paths.PREPARED_DIR}: run `dvc repro` to retrain it")
    batches = data.eval_batches(prepared.test, saved["mean"], saved["std"], device, workers=workers)
    labels, probs = loop.predict(model, batches, device)
    return labels.numpy(), probs.argmax(dim=1).numpy(), saved["config"]["model"]["name"]


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


def report(cfg: Config) -> None:
    """reports/metrics.json for the final model, compare.md across models, DVC plots and PNGs."""
    from pipeline import files, reporting
    from pipeline.evaluation import KEYS, LEVEL, METRIC_KEYS, RESAMPLES, shown

    runs = evaluated_runs(cfg)
    remedy = "run the train and evaluate stages first (`dvc repro`)"
    test = {run: files.read_json(paths.eval_dir(run) / "metrics.json", remedy) for run in runs}
    fit = {run: files.read_json(RunPaths.of(run).metrics, remedy) for run in runs}
    # every input read and checked before anything is written: a bad one leaves every output as it was
    histories = {run: _read_history(RunPaths.of(run).history) for run in runs}
    try:
        rows = [[run_label(run, fit[run]["model"]), *(shown(test[run], key) for key in METRIC_KEYS),
                 f"{fit[run]['parameters']:,}", fit[run]["best_epoch"]] for run in runs]
        final = {key: test[FINAL][key] for key in KEYS}
    except (KeyError, TypeError) as err:
        raise UserError(f"reports/eval or reports/train hold files of another version (no {err}); "
                        "run `dvc repro -f evaluate` and the train stages again") from None
    header = ["model", *(key.replace("_", " ") for key in METRIC_KEYS), "parameters", "best epoch"]
    how = (f"Each value's {LEVEL:.0%} interval [low, high]: a seeded bootstrap over the {final['images']} test "
           f"images ({RESAMPLES:,} resamples), how far another test set of this size could move it. Differences "
           "within it are not evidence that one model is better.")
    files.write_text(paths.COMPARE_MD, f"# Test-set comparison on {cfg.data.name}\n\n"
                     + reporting.markdown_table(header, rows) + f"\n{how}\n")
    files.write_json(paths.METRICS_JSON, final)

    # the final model's predictions and confusion matrix as `evaluate` wrote them, where DVC's plots expect them
    files.copy_file(paths.eval_dir(FINAL) / "predictions.csv", paths.PLOTS_DIR / "confusion.csv")
    files.copy_file(paths.eval_dir(FINAL) / "confusion_matrix.png", paths.PLOTS_DIR / "confusion.png")
    reporting.plot_curves(histories, paths.PLOTS_DIR / "curves.png")
    files.write_csv(paths.PLOTS_DIR / "curves.csv", reporting.LONG_CURVE_COLUMNS, reporting.long_curve_rows(histories))
    print(f"final model ({fit[FINAL]['model']}): " + ", ".join(f"{k} {shown(final, k)}" for k in METRIC_KEYS))
