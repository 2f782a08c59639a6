"""`report`: the evaluations compared -> reports/metrics.json, models.json, compare.md and DVC's plots."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.paths import FINAL, RunPaths
from pipeline.stages import evaluated_runs, run_label, train_stage


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


def _read_history(path: Path) -> list:
    """A run's history.csv as EpochMetrics; a file that holds no epochs, or something else than numbers, is one
    line naming it (a report silently missing a run's curves would look whole)."""
    from pipeline import files, metrics

    remedy = f"run its train stage again (`dvc repro -f {train_stage(path)}`)"
    try:
        history = [metrics.from_history_row(row) for row in files.read_csv(path, remedy)]
    except (KeyError, ValueError, TypeError) as err:
        reason = f"no column {err}" if isinstance(err, KeyError) else str(err)
        raise UserError(f"{path} is corrupt ({reason}): {remedy}") from None
    if not history:
        raise UserError(f"{path} holds no epochs: {remedy}")
    return history


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
