"""One function per DVC stage: a validated Config in, files out.

Paths are relative to the repository root, where DVC runs every stage.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.errors import CheckFailed, UserError, first_line

if TYPE_CHECKING:  # numpy comes with torch; stages import their heavy modules lazily
    import numpy as np

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
FINAL = "final"  # run name of the model that `report` presents (model.name, trained by `train --final`)


@dataclass(frozen=True)
class RunPaths:
    """Where one training run's outputs go (`reproduce` points these at a scratch folder)."""

    model_dir: Path
    reports: Path
    checkpoints: Path

    @classmethod
    def of(cls, run_name: str, root: Path = Path(".")) -> RunPaths:
        return cls(root / MODELS_DIR / run_name, root / REPORTS_DIR / "train" / run_name,
                   root / CHECKPOINTS_DIR / run_name)

    @property
    def model(self) -> Path:
        return self.model_dir / "model.pt"


def model_path(run_name: str) -> Path:
    return RunPaths.of(run_name).model


def train_report_dir(run_name: str) -> Path:
    return RunPaths.of(run_name).reports


def eval_report_dir(run_name: str) -> Path:
    return REPORTS_DIR / "eval" / run_name


def run_label(cfg: Config, run_name: str) -> str:
    """How reports name a run: the final one says which model it is."""
    return f"{run_name} ({cfg.model.name})" if run_name == FINAL else run_name


def evaluated_runs(cfg: Config) -> list[str]:
    return [*cfg.models, FINAL]


def raw_dir(cfg: Config) -> Path:
    return RAW_DIR / cfg.data.name


def download(cfg: Config) -> None:
    """Fetch raw files (torchvision datasets, MD5-verified) or record what a bundled/local dataset holds."""
    from pipeline import datasets, reporting

    out = raw_dir(cfg)
    if cfg.data.name in datasets.TORCHVISION_DATASETS:
        files = datasets.download(cfg.data.name, out, cfg.data.mirror, cfg.data.retries)
        print(f"downloaded and verified {cfg.data.name}: {', '.join(path.name for path in files)} -> {out}")
        return
    if cfg.data.name == "folder":
        # DVC sees a folder outside the repo only through this manifest: re-run `download` after changing it.
        manifest = datasets.folder_manifest(Path(cfg.data.path))
    else:
        import sklearn

        manifest = {"source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
                    "scikit-learn": sklearn.__version__}
    reporting.write_json(out / "manifest.json", manifest)
    print(f"{cfg.data.name}: nothing to download; manifest -> {out / 'manifest.json'}")


def prepare(cfg: Config) -> None:
    """Decode once into uint8 tensors with a seeded, stratified train/val(/test) split, plus a sample grid."""
    from pipeline import data, datasets, reporting

    name = cfg.data.name
    if name == "digits":
        images, labels, classes = data.load_digits_raw()
        splits = data.split_dataset(images, labels, cfg.data, cfg.seed)
        source = "sklearn.datasets.load_digits"
    else:
        if name == "folder":
            raw = datasets.load_folder(Path(cfg.data.path), cfg.data.channels, cfg.data.image_size,
                                       cfg.data.skip_bad_images)
            source = str(Path(cfg.data.path).resolve())
        else:
            raw = datasets.load_raw(name, raw_dir(cfg))
            source = f"torchvision.datasets ({name}), verified MD5s"
        test = data.Split(raw.test_images, raw.test_labels) if raw.test_images is not None else None
        splits = data.split_dataset(raw.train_images, raw.train_labels, cfg.data, cfg.seed, test=test)
        classes = raw.classes
    meta = data.save_prepared(PREPARED_DIR, splits, classes, source=source)
    reporting.plot_samples(splits["train"].images[:9], [classes[i] for i in splits["train"].labels[:9].tolist()],
                           REPORTS_DIR / "data" / "samples.png", title=f"{name}: training samples")
    print(f"prepared {name}: {meta['sizes']} images of shape {meta['shape']} -> {PREPARED_DIR}")


def train(cfg: Config, run_name: str, paths: RunPaths | None = None) -> str | None:
    """Train `cfg.model.name` with the shared loop; write the model, its history and metrics.

    Returns the MLflow run id (None with tracking off).
    """
    from pipeline import data, loop, models, reporting

    paths = paths or RunPaths.of(run_name)
    prepared = data.load_prepared(PREPARED_DIR)
    device = loop.resolve_device(cfg.train.device)
    model, train_batches, val_batches = training_setup(cfg, prepared, device)
    print(f"[{run_name}] {cfg.model.name}: {models.count_parameters(model):,} parameters on {device}, "
          f"{len(prepared.train)} train / {len(prepared.val)} val images", flush=True)

    mlflow_name = f"{cfg.model.name}-{cfg.fingerprint()}" if run_name == cfg.model.name \
        else f"{cfg.model.name}-{run_name}-{cfg.fingerprint()}"
    with tracked_run(cfg, mlflow_name, prepared.md5, role=run_name) as run:
        callbacks = [loop.ConsoleLog(run_name, cfg.train.epochs)] + ([run.metrics] if run else [])
        checkpoints = loop.Checkpoints(paths.checkpoints, cfg.fingerprint())
        result = loop.fit(model, train_batches, val_batches, cfg.train, device, callbacks, checkpoints)

        models.save_model(paths.model, result.best_state, cfg, prepared.classes, prepared.input_shape,
                          prepared.mean, prepared.std, run_name=run_name, best_epoch=result.best_epoch,
                          mlflow_run_id=run.run_id if run else "", data_md5=prepared.md5)
        best = result.best
        summary = {
            "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "train_accuracy": best.train_accuracy, "val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
            # a train/val gap that keeps growing is the classic over-fitting signal
            "generalization_gap": best.train_accuracy - best.val_accuracy,
            "params": models.count_parameters(model),
            "train_seconds": round(sum(m.seconds for m in result.history), 3),
        }
        reporting.write_csv(paths.reports / "history.csv", reporting.HISTORY_COLUMNS,
                            reporting.history_rows(result.history))
        reporting.write_json(paths.reports / "metrics.json", summary)
        reporting.plot_curves({run_name: result.history}, paths.reports / "curves.png")
        if run:
            run.log_metrics({f"best_{k}": v for k, v in summary.items()}
                            | {"tracking_seconds": run.metrics.seconds_spent})
            run.log_config()
            run.log_artifacts(paths.reports / "history.csv", paths.reports / "curves.png")
            if cfg.tracking.log_models:
                model.load_state_dict(result.best_state)
                classifier = models.Classifier(model.cpu(), prepared.mean, prepared.std, prepared.classes,
                                               prepared.input_shape).eval()
                example = prepared.val.images[:2].float().div(255).numpy()
                registered = f"{cfg.data.name}-{cfg.model.name}" if run_name == FINAL else None
                run.log_model(classifier, example, registered)
    print(f"[{run_name}] best epoch {result.best_epoch}: val_accuracy {best.val_accuracy:.4f} -> {paths.model}")
    return run.run_id if run else None


def training_setup(cfg: Config, prepared, device):
    """Seeded model and (train, val) batches on `device`: the same start for `train` and every trial."""
    from pipeline import data, loop, models

    loop.seed_everything(cfg.seed, cfg.train.deterministic)
    model = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
    train_batches, val_batches = data.training_batches(
        prepared, cfg.train.batch_size, cfg.data.augment, cfg.seed, device,
        drop_last=cfg.train.drop_last, channels_last=cfg.train.channels_last)
    return model, train_batches, val_batches


def tracked_run(cfg: Config, name: str, data_md5: str, role: str, run_id: str | None = None,
                parent_run_id: str | None = None, finished_on: tuple[type[BaseException], ...] = ()):
    """An MLflow run (tracking.enabled) or a do-nothing context that yields None."""
    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    from pipeline import tracking

    tags = tracking.lineage_tags(cfg, data_md5, role) if run_id is None else {}
    return tracking.TrackedRun(cfg, name, tags, run_id=run_id, parent_run_id=parent_run_id, finished_on=finished_on)


TUNE_DIR = REPORTS_DIR / "tune"


def tune(cfg: Config, worker_args: list[str], worker: bool = False) -> None:
    """Optuna search over tune.space for model.name -> reports/tune/ (best_params.json, trials, plots)."""
    from pipeline import tuning

    if not cfg.tune.space:
        raise UserError("tune.space is empty: declare at least one param to search")
    if worker:
        tuning.work(cfg, PREPARED_DIR)
    else:
        tuning.tune(cfg, PREPARED_DIR, TUNE_DIR, worker_args)


def tuned(cfg: Config, best_params: Path) -> Config:
    """cfg with the winning values of a search (reports/tune/best_params.json) applied."""
    from pipeline import reporting

    if not best_params.exists():
        raise UserError(f"tuned params missing: {best_params} (run `python -m pipeline tune` or `dvc repro tune`)")
    record = reporting.read_json(best_params)
    print(f"[final] using trial {record['trial']} of study {record['study']}: {record['params']}")
    return cfg.with_overrides(record["params"])


def evaluate(cfg: Config) -> None:
    """Test-set predictions of every trained model -> scikit-learn metrics and reports."""
    from pipeline import data, evaluation, loop, reporting

    prepared = data.load_prepared(PREPARED_DIR)
    device = loop.resolve_device(cfg.train.device)
    for run_name in evaluated_runs(cfg):
        saved, y_true, y_pred = predict_test_set(model_path(run_name), prepared, device)
        metrics = evaluation.classification_metrics(y_true, y_pred)
        text, as_dict = evaluation.report(y_true, y_pred, prepared.classes)
        matrix = evaluation.confusion(y_true, y_pred, prepared.num_classes)

        out = eval_report_dir(run_name)
        reporting.write_json(out / "metrics.json", metrics)
        reporting.write_text(out / "classification_report.txt", text)
        reporting.write_json(out / "classification_report.json", as_dict)
        reporting.write_csv(out / "confusion_matrix.csv", ["actual\\predicted", *prepared.classes],
                            [[name, *row] for name, row in zip(prepared.classes, matrix.tolist())])
        reporting.write_csv(out / "predictions.csv", ["actual", "predicted"],
                            [(prepared.classes[t], prepared.classes[p]) for t, p in zip(y_true, y_pred)])
        reporting.plot_confusion(matrix, prepared.classes, out / "confusion_matrix.png",
                                 title=f"{run_label(cfg, run_name)} on {cfg.data.name}: "
                                       f"accuracy {metrics['accuracy']:.4f}")
        _log_test_results(cfg, saved, metrics, out)
        print(f"[{run_name}] test accuracy {metrics['accuracy']:.4f} f1_macro {metrics['f1_macro']:.4f}")


def predict_test_set(path: Path, prepared, device) -> tuple[dict, np.ndarray, np.ndarray]:
    """(saved model payload, true labels, predicted labels) on the test split."""
    from pipeline import data, loop, models

    model, saved = models.load_model(path)
    batches = data.eval_batches(prepared.test, saved["mean"], saved["std"], device)
    labels, probs = loop.predict(model, batches, device)
    return saved, labels.numpy(), probs.argmax(dim=1).numpy()


def _log_test_results(cfg: Config, saved: dict, metrics: dict[str, float], out: Path) -> None:
    """Attach test metrics and reports to the MLflow run that trained the model."""
    if not (cfg.tracking.enabled and saved.get("mlflow_run_id")):
        return
    import mlflow

    try:
        with tracked_run(cfg, "", saved.get("data_md5", ""), role="", run_id=saved["mlflow_run_id"]) as run:
            run.log_metrics({f"test_{key}": value for key, value in metrics.items()})
            run.log_artifacts(*(out / name for name in ("confusion_matrix.png", "confusion_matrix.csv",
                                                         "classification_report.txt",
                                                         "classification_report.json")))
    except mlflow.exceptions.MlflowException as err:  # e.g. the store was deleted since training
        print(f"warning: test metrics not logged to MLflow run {saved['mlflow_run_id']}: "
              f"{first_line(err)}", file=sys.stderr)


def report(cfg: Config) -> None:
    """reports/metrics.json for the final model, compare.md across models, DVC plots and PNGs."""
    from pipeline import reporting
    from pipeline.evaluation import METRIC_KEYS

    runs = evaluated_runs(cfg)
    for run_name in runs:
        for path in (eval_report_dir(run_name) / "metrics.json", train_report_dir(run_name) / "metrics.json"):
            if not path.exists():
                raise UserError(f"missing {path}: run the train and evaluate stages first (`dvc repro`)")
    rows = []
    for run_name in runs:
        test = reporting.read_json(eval_report_dir(run_name) / "metrics.json")
        fit = reporting.read_json(train_report_dir(run_name) / "metrics.json")
        rows.append([run_label(cfg, run_name), test["accuracy"], test["precision_macro"], test["recall_macro"], test["f1_macro"],
                     test["f1_weighted"], f"{fit['params']:,}", f"{fit['train_seconds']:.1f}"])
    header = ["model", "accuracy", "precision (macro)", "recall (macro)", "F1 (macro)", "F1 (weighted)",
              "params", "train seconds"]
    reporting.write_text(REPORTS_DIR / "compare.md",
                         f"# Test-set comparison on {cfg.data.name}\n\n" + reporting.markdown_table(header, rows))

    final = reporting.read_json(eval_report_dir(FINAL) / "metrics.json")
    reporting.write_json(REPORTS_DIR / "metrics.json", {key: final[key] for key in METRIC_KEYS})

    plots = REPORTS_DIR / "plots"
    # the final model's predictions and confusion matrix as `evaluate` wrote them, where DVC's plots expect them
    reporting.copy_file(eval_report_dir(FINAL) / "predictions.csv", plots / "confusion.csv")
    reporting.copy_file(eval_report_dir(FINAL) / "confusion_matrix.png", plots / "confusion.png")
    histories = {run: _read_history(train_report_dir(run) / "history.csv") for run in runs}
    reporting.plot_curves(histories, plots / "curves.png")
    reporting.write_csv(plots / "curves.csv", ["epoch", "run", "split", "loss", "accuracy"],
                        reporting.long_curve_rows(histories))
    print(f"final model ({cfg.model.name}): " + ", ".join(f"{k} {final[k]:.4f}" for k in METRIC_KEYS))


def _read_history(path: Path):
    import csv

    from pipeline.loop import EpochMetrics

    with open(path, newline="") as handle:
        return [EpochMetrics(epoch=int(row["epoch"]), samples_per_s=0.0,
                             **{k: float(row[k]) for k in row if k != "epoch"})
                for row in csv.DictReader(handle)]


def predict(cfg: Config, images: list[str], model_uri: str | None) -> None:
    """Top-3 classes for image files, from the final local model or an MLflow model URI."""
    import torch

    from pipeline import datasets, models

    if model_uri:
        import mlflow.pytorch

        from pipeline import tracking

        tracking.connect(cfg.tracking)
        try:
            classifier = mlflow.pytorch.load_model(model_uri, map_location="cpu").eval()
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for a bad URI
            raise UserError(f"cannot load model {model_uri}: {first_line(err)}") from None
    else:
        classifier = models.load_classifier(model_path(FINAL))
    channels, height, _ = classifier.input_shape
    pixels = torch.stack([datasets.load_image(Path(path), channels, height) for path in images]).float().div(255)
    with torch.inference_mode():
        probs = classifier(pixels)
    top = probs.topk(min(3, probs.shape[1]), dim=1)
    for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist()):
        ranked = ", ".join(f"{classifier.classes[i]} {p:.3f}" for p, i in zip(values, indices))
        print(f"{path}: {classifier.classes[indices[0]]}  (top-3: {ranked})")


def reproduce(cfg: Config, run_id: str) -> None:
    """Retrain an MLflow run from its logged config on the same data; compare test metrics exactly."""
    import tempfile

    import mlflow
    import yaml

    from pipeline import data, evaluation, loop, tracking
    from pipeline.config import validate

    client = tracking.connect(cfg.tracking)
    try:
        run = client.get_run(run_id)
        logged = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except mlflow.exceptions.MlflowException as err:
        raise UserError(f"cannot reproduce run {run_id} from {tracking.tracking_uri(cfg.tracking)}: "
                        f"{first_line(err)}") from None
    original = validate(yaml.safe_load(logged), source=f"run {run_id} config.yaml")
    tags = run.data.tags
    prepared = data.load_prepared(PREPARED_DIR)
    if original.data.name != cfg.data.name or prepared.md5 != tags.get("data.md5"):
        commit = tags.get("mlflow.source.git.commit", "<the run's commit>")
        raise UserError(f"{PREPARED_DIR} (md5 {prepared.md5}, {cfg.data.name}) is not the data run {run_id} trained "
                        f"on (md5 {tags.get('data.md5')}, {original.data.name}): run `git checkout {commit} && "
                        f"dvc checkout {PREPARED_DIR}` (or `dvc repro prepare` there) first")

    retrain = original.with_overrides({"tracking.enabled": False, "train.resume": False})
    role = tags.get("pipeline.role", original.model.name)
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:  # never touches models/ or reports/
        paths = RunPaths.of(role, Path(scratch))
        train(retrain, role, paths)
        _, y_true, y_pred = predict_test_set(paths.model, prepared, loop.resolve_device(retrain.train.device))
    new = {f"test_{k}": v for k, v in evaluation.classification_metrics(y_true, y_pred).items()}
    old = {key: run.data.metrics.get(key) for key in new}
    print(f"\n{'metric':<26}{'run ' + run_id[:8]:>14}{'reproduced':>14}")
    for key in new:
        mark = "" if old[key] == new[key] else "   <- differs"
        shown = "missing" if old[key] is None else f"{old[key]:.6f}"
        print(f"{key:<26}{shown:>14}{new[key]:>14.6f}{mark}")
    differing = [key for key in new if old[key] != new[key]]
    if differing:
        raise CheckFailed(f"run {run_id} not reproduced: {', '.join(differing)} differ")
    print(f"run {run_id} reproduced exactly")


def ui(cfg: Config, mlflow_port: int, optuna_port: int) -> None:
    """Serve the MLflow UI and optuna-dashboard on 127.0.0.1 against this repo's stores until Ctrl-C."""
    import subprocess

    from pipeline import tracking, tuning

    bin_dir = Path(sys.executable).parent
    servers = {
        f"MLflow UI:        http://127.0.0.1:{mlflow_port}": [
            str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking.tracking_uri(cfg.tracking),
            "--host", "127.0.0.1", "--port", str(mlflow_port)],
        f"Optuna dashboard: http://127.0.0.1:{optuna_port}": [
            str(bin_dir / "optuna-dashboard"), tuning.storage_url(cfg.tune), "--host", "127.0.0.1",
            "--port", str(optuna_port)],
    }
    processes = [subprocess.Popen(command) for command in servers.values()]
    print("\n".join(servers), flush=True)
    try:
        for process in processes:
            process.wait()
    finally:
        for process in processes:
            process.terminate()
