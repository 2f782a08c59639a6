"""What a search leaves for people and for DVC: best_params.json, trials.csv and Optuna's own plots."""

from __future__ import annotations

import sys
import warnings

import optuna

from pipeline import files, paths
from pipeline.config import Config
from pipeline.tuning.space import decoded_params


def trial_rows(study: optuna.Study, cfg: Config) -> tuple[list[str], list[list]]:
    """trials.csv: number, state, value, the pruning epoch and the params; deterministic (no times, no run ids)."""
    keys = list(cfg.tune.space)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        last = max(trial.intermediate_values, default="")
        params = decoded_params(trial, cfg.tune.space) if trial.params else {}
        rows.append([trial.number, trial.state.name, "" if trial.value is None else round(trial.value, 6), last,
                     trial.user_attrs.get("fail_reason", ""), *(params.get(key, "") for key in keys)])
    return ["number", "state", cfg.tune.metric, "epochs", "fail_reason", *keys], rows


# Importances are a random forest fitted on the completed trials (pruned ones have no final value): on fewer than
# two per searched param it ranks noise, and its bars would look like an answer.
MIN_COMPLETED_PER_PARAM = 2


def _too_few(completed: int, needed: int):
    """In place of importance bars: why there are none."""
    from pipeline import reporting

    figure, ax = reporting.pyplot().subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"Parameter importances need at least {needed} completed trials ({MIN_COMPLETED_PER_PARAM} per "
                      f"searched param);\nthis study has {completed} (pruned trials have no final value).",
            ha="center", va="center", fontsize=12)
    print(f"[tune] param_importances: {completed} completed trials, too few for importances (at least {needed})",
          file=sys.stderr)
    return ax


def write_reports(study: optuna.Study, record: dict, cfg: Config) -> None:
    """best_params.json, trials.csv, and Optuna's own plots as readable PNGs."""
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline import reporting

    files.write_json(paths.BEST_PARAMS, record)
    files.write_csv(paths.TRIALS_CSV, *trial_rows(study, cfg))
    plt = reporting.pyplot()
    metric = cfg.tune.metric
    log_scale = metric == "val_loss"  # good losses differ by factors, not by a constant
    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    needed = MIN_COMPLETED_PER_PARAM * len(cfg.tune.space)
    plots = {"optimization_history": optuna_plots.plot_optimization_history,
             "param_importances": optuna_plots.plot_param_importances if completed >= needed
             else lambda *args, **kwargs: _too_few(completed, needed),
             "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
             "intermediate_values": optuna_plots.plot_intermediate_values}
    options = {"optimization_history": {"target_name": metric}, "parallel_coordinate": {"target_name": metric},
               # fANOVA fits a random forest: seeded, or the same trials draw another picture every run
               "param_importances": {"target_name": metric,
                                     "evaluator": optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed)}}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. a param with one value so far: flat axis
                axes = plot(study, **options.get(name, {}))
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            print(f"[tune] skipped {name} plot: {err}", file=sys.stderr)
            continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = ax.get_figure()
        figure.set_size_inches(11, 5.5)
        if name in ("optimization_history", "intermediate_values") and log_scale:
            ax.set_yscale("log")
        if name == "intermediate_values":
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{metric} per epoch (pruned trials stop early)")
            if ax.get_legend():
                ax.get_legend().remove()  # one line per trial: a 24-entry legend hides the lines
        if name == "param_importances" and completed >= needed:  # one evaluator, named: the dashboard has its own
            ax.set_title(f"{ax.get_title()}: fANOVA (seed {cfg.seed}) over {completed} completed trials")
        if name == "parallel_coordinate":
            for label in ax.get_xticklabels():
                label.set_rotation(20)
                label.set_horizontalalignment("right")
        figure.text(0.995, 0.995, f"study {study.study_name}", ha="right", va="top", fontsize=8, color="0.4")
        reporting.save_figure(figure, paths.TUNE_PLOTS / f"{name}.png")
    plt.close("all")
