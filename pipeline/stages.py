"""One function per DVC stage: a validated Config in, files out.

Paths are relative to the repository root, where DVC runs every stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError

PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
FINAL = "final"  # run name of the model that `report` presents (model.name, trained by `train --final`)


def model_path(run_name: str) -> Path:
    return MODELS_DIR / run_name / "model.pt"


def train_report_dir(run_name: str) -> Path:
    return REPORTS_DIR / "train" / run_name


def eval_report_dir(run_name: str) -> Path:
    return REPORTS_DIR / "eval" / run_name


def evaluated_runs(cfg: Config) -> list[str]:
    return [*cfg.models, FINAL]


def prepare(cfg: Config) -> None:
    from pipeline import data

    if cfg.data.name != "digits":
        raise UserError(f"data.name={cfg.data.name!r} is not available yet; use 'digits'")
    images, labels, classes = data.load_digits_raw()
    splits = data.split_dataset(images, labels, cfg.data, cfg.seed)
    meta = data.save_prepared(PREPARED_DIR, splits, classes, source="sklearn.datasets.load_digits")
    print(f"prepared {cfg.data.name}: {meta['sizes']} images of shape {meta['shape']} -> {PREPARED_DIR}")


def train(cfg: Config, run_name: str) -> None:
    """Train `cfg.model.name` with the shared loop; write the model, its history and metrics."""
    from pipeline import data, loop, models, reporting

    prepared = data.load_prepared(PREPARED_DIR)
    loop.seed_everything(cfg.seed, cfg.train.deterministic)
    device = loop.resolve_device(cfg.train.device)
    model = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
    train_batches, val_batches = data.training_batches(
        prepared, cfg.train.batch_size, cfg.data.augment, cfg.seed, device,
        drop_last=cfg.train.drop_last, channels_last=cfg.train.channels_last)
    print(f"[{run_name}] {cfg.model.name}: {models.count_parameters(model):,} parameters on {device}, "
          f"{len(prepared.train)} train / {len(prepared.val)} val images", flush=True)

    callbacks = [loop.ConsoleLog(run_name, cfg.train.epochs)]
    checkpoints = loop.Checkpoints(CHECKPOINTS_DIR / run_name, cfg.fingerprint())
    result = loop.fit(model, train_batches, val_batches, cfg.train, device, callbacks, checkpoints)

    models.save_model(model_path(run_name), result.best_state, cfg, prepared.classes, prepared.input_shape,
                      prepared.mean, prepared.std, run_name=run_name, best_epoch=result.best_epoch)
    out = train_report_dir(run_name)
    reporting.write_csv(out / "history.csv", reporting.HISTORY_COLUMNS, reporting.history_rows(result.history))
    best = result.best
    reporting.write_json(out / "metrics.json", {
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_accuracy": best.train_accuracy, "val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
        # a train/val gap that keeps growing is the classic overfitting signal
        "generalization_gap": best.train_accuracy - best.val_accuracy,
        "params": models.count_parameters(model), "train_seconds": round(sum(m.seconds for m in result.history), 3),
    })
    reporting.plot_curves({run_name: result.history}, out / "curves.png")
    print(f"[{run_name}] best epoch {result.best_epoch}: val_accuracy {best.val_accuracy:.4f} -> {model_path(run_name)}")


def evaluate(cfg: Config) -> None:
    """Test-set predictions of every trained model -> scikit-learn metrics and reports."""
    from pipeline import data, evaluation, loop, models, reporting

    prepared = data.load_prepared(PREPARED_DIR)
    device = loop.resolve_device(cfg.train.device)
    for run_name in evaluated_runs(cfg):
        model, saved = models.load_model(model_path(run_name))
        batches = data.eval_batches(prepared.test, saved["mean"], saved["std"], device)
        labels, probs = loop.predict(model, batches, device)
        y_true, y_pred = labels.numpy(), probs.argmax(dim=1).numpy()
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
        print(f"[{run_name}] test accuracy {metrics['accuracy']:.4f} f1_macro {metrics['f1_macro']:.4f}")


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
        label = f"{run_name} ({cfg.model.name})" if run_name == FINAL else run_name
        rows.append([label, test["accuracy"], test["precision_macro"], test["recall_macro"], test["f1_macro"],
                     test["f1_weighted"], f"{fit['params']:,}", f"{fit['train_seconds']:.1f}"])
    header = ["model", "accuracy", "precision (macro)", "recall (macro)", "F1 (macro)", "F1 (weighted)",
              "params", "train seconds"]
    reporting.write_text(REPORTS_DIR / "compare.md",
                         f"# Test-set comparison on {cfg.data.name}\n\n" + reporting.markdown_table(header, rows))

    final = reporting.read_json(eval_report_dir(FINAL) / "metrics.json")
    reporting.write_json(REPORTS_DIR / "metrics.json", {key: final[key] for key in METRIC_KEYS})

    plots = REPORTS_DIR / "plots"
    predictions = (eval_report_dir(FINAL) / "predictions.csv").read_text()
    reporting.write_text(plots / "confusion.csv", predictions)
    classes, matrix = _read_confusion(eval_report_dir(FINAL) / "confusion_matrix.csv")
    reporting.plot_confusion(matrix, classes, plots / "confusion.png",
                             title=f"{cfg.model.name} on {cfg.data.name}: accuracy {final['accuracy']:.4f}")
    histories = {run: _read_history(train_report_dir(run) / "history.csv") for run in runs}
    reporting.plot_curves(histories, plots / "curves.png")
    reporting.write_csv(plots / "curves.csv", ["epoch", "run", "split", "loss", "accuracy"],
                        reporting.long_curve_rows(histories))
    print(f"final model ({cfg.model.name}): " + ", ".join(f"{k} {final[k]:.4f}" for k in METRIC_KEYS), file=sys.stdout)


def _read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    import csv

    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header[1:], [[int(v) for v in row[1:]] for row in rows]


def _read_history(path: Path):
    import csv

    from pipeline.loop import EpochMetrics

    with open(path, newline="") as handle:
        return [EpochMetrics(epoch=int(row["epoch"]), samples_per_s=0.0,
                             **{k: float(row[k]) for k in row if k != "epoch"})
                for row in csv.DictReader(handle)]
