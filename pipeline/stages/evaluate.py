"""`evaluate`: every trained model (and each seed replicate) on the test set -> reports/eval/<run>/, and MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.paths import RunPaths
from pipeline.stages import evaluated_runs, run_label, train_stage


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
                        f"{train_stage(run_paths.model)}`)") from None
    if not whole:
        raise UserError(f"{run_paths.model_dir} does not hold the {replicate['of']} seed replicates its model.pt "
                        f"says it is one of (seeds {seeds[0]}-{seeds[-1]}): train it again (`dvc repro -f "
                        f"{train_stage(run_paths.model)}`)")
    return [run_paths.model if i == replicate["index"] else path for i, path in enumerate(expected)], \
        replicate["index"]


def predict_test_set(model_file: Path, prepared, device, workers: int = 0):
    """(true labels, class probabilities, the model file's payload) on the test split, as numpy arrays."""
    from pipeline import batching, loop, models

    model, saved = models.load_model(model_file)
    if saved["classes"] != prepared.classes or tuple(saved["input_shape"]) != prepared.input_shape:
        raise UserError(f"{model_file} was trained on other data ({len(saved['classes'])} classes, input "
                        f"{tuple(saved['input_shape'])}) than {paths.PREPARED_DIR}: run `dvc repro` to retrain it")
    batches = batching.eval_batches(prepared.test, saved["mean"], saved["std"], device, workers=workers)
    labels, probs = loop.predict(model, batches, device)
    return labels.numpy(), probs.numpy(), saved
