"""A search that is not fooled by luck: the best trials and the untuned settings retrained with several seeds.

A trial's value comes from one seed, so the best of many trials is partly the
luckiest draw. Once the trials are done, `confirm` retrains the params of the
best `tune.confirm` distinct completed trials, and of the untuned settings'
trial (params.yaml's, the search's first), with `replicates` seeds each: all
of them as one population through the shared loop, each judged as its trial
was (tune.epochs epochs, the best epoch's tune.metric). The best mean wins,
but it ships only if it beats the untuned settings beyond the seeds' noise: a
paired t interval over the seeds (scipy.stats.ttest_rel) that excludes 0.
Otherwise the untuned settings ship, and the record says why.

Optuna refuses attributes on finished trials, so the study keeps the
confirmation as its own user attributes (`confirm_trial_<number>`), which
optuna-dashboard shows with the study.
"""

from __future__ import annotations

import contextlib
import json
import statistics

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from pipeline import loop, population, training
from pipeline.metrics import is_better, worst
from pipeline.tuning.space import decoded_params
from pipeline.tuning.study import STUDY_TAG, TRIAL_TAG, Search, trial_config

LEVEL = 0.95
UNTUNED = "params.yaml"  # the `origin` of the untuned settings' trial (study.open_search enqueues it)


def candidates(search: Search) -> tuple[list[FrozenTrial], FrozenTrial | None]:
    """The best tune.confirm completed trials with distinct params, then the untuned settings' trial (whatever
    its state: a pruned one is still what ships without tuning) unless it is one of them; and that trial."""
    tune = search.cfg.tune
    complete = search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda trial: trial.value, reverse=tune.direction == "maximize")
    chosen: list[FrozenTrial] = []
    seen: dict[str, FrozenTrial] = {}
    for trial in ranked:
        key = _key(trial, search)
        if key not in seen and len(chosen) < tune.confirm:
            seen[key] = trial
            chosen.append(trial)
    untuned = next((trial for trial in search.study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED)) if trial.user_attrs.get("origin") == UNTUNED), None)
    if untuned is not None:
        untuned = seen.get(_key(untuned, search), untuned)  # the same params under a sampled trial count as it
        if untuned not in chosen:
            chosen.append(untuned)
    return chosen, untuned


def _key(trial: FrozenTrial, search: Search) -> str:
    return json.dumps(decoded_params(trial, search.cfg.tune.space), sort_keys=True, default=str)


def confirm(search: Search) -> dict | None:
    """Retrain the candidates with `replicates` seeds, pick what ships; the record best_params.json keeps (None
    when tune.confirm is 0 or there is one seed: nothing to confirm with)."""
    cfg = search.cfg
    if not cfg.tune.confirm or cfg.replicates < 2:
        return None
    chosen, untuned = candidates(search)
    if not chosen:
        return None
    values = _retrain(search, chosen)
    metric = cfg.tune.metric
    means = {number: statistics.mean(each) for number, each in values.items()}
    winner = chosen[0].number
    for trial in chosen[1:]:
        if is_better(metric, means[trial.number], means[winner]):
            winner = trial.number
    record: dict = {"seeds": [cfg.seed + i for i in range(cfg.replicates)], "level": LEVEL, "candidates": [
        {"trial": trial.number, "untuned": trial is untuned, "params": decoded_params(trial, cfg.tune.space),
         "search_value": trial.value, "values": values[trial.number], "mean": means[trial.number],
         "std": statistics.stdev(values[trial.number])} for trial in chosen], "winner": winner}
    if untuned is None:
        shipped, why = winner, "params.yaml's settings are not a trial of this search: nothing to hold the winner to"
    elif winner == untuned.number:
        shipped, why = winner, "the untuned settings have the best mean over the seeds"
    else:
        low, high = paired_interval(values[winner], values[untuned.number])
        beyond = high < 0 if cfg.tune.direction == "minimize" else low > 0
        record["tuned_minus_untuned"] = {"mean": means[winner] - means[untuned.number], "low": low, "high": high}
        shipped = winner if beyond else untuned.number
        shown = f"{metric} {means[winner] - means[untuned.number]:+.4f} [{low:+.4f}, {high:+.4f}]"
        why = (f"trial {winner} beats the untuned settings beyond the seeds' noise ({shown})" if beyond else
               f"trial {winner} does not beat the untuned settings beyond the seeds' noise ({shown}): they ship")
    record |= {"shipped": shipped, "why": why}
    for entry in record["candidates"]:  # beside the study, where optuna-dashboard shows them
        search.study.set_user_attr(f"confirm_trial_{entry['trial']}", {
            key: entry[key] for key in ("mean", "std", "values")} | {"seeds": record["seeds"]})
    search.study.set_user_attr("confirm_shipped", shipped)
    return record


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """LEVEL interval of the mean of a - b, paired by seed (Student's t over the seeds); a constant difference is
    its own interval."""
    from scipy.stats import ttest_rel

    diff = np.subtract(a, b)
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])
    interval = ttest_rel(a, b).confidence_interval(LEVEL)
    return float(interval.low), float(interval.high)


def _retrain(search: Search, chosen: list[FrozenTrial]) -> dict[int, list[float]]:
    """Each candidate's params with every seed, as one population; per trial its runs' values, by seed (a run
    whose loss diverged counts as the worst value)."""
    cfg, study = search.cfg, search.study
    runs: list[loop.Run] = []
    with contextlib.ExitStack() as tracked:
        for trial in chosen:
            trial_cfg = trial_config(cfg, decoded_params(trial, cfg.tune.space))
            for member in training.replicate_configs(trial_cfg):
                model, train_batches, val_batches = training.setup(member, search.prepared, search.device)
                run = tracked.enter_context(training.tracked_run(
                    member, f"{study.study_name}-confirm-{trial.number:03d}-seed{member.seed}", "confirm",
                    search.prepared.md5, parent_run_id=search.parent_run_id,
                    tags={STUDY_TAG: study.study_name, TRIAL_TAG: str(trial.number),
                          "replicate.seed": str(member.seed), "pipeline.confirm": "true"}))
                runs.append(loop.Run(model, member.train, train_batches, val_batches,
                                     [run.metrics] if run else [], key=trial.number))
        population.fit_together(runs, search.device)
    values: dict[int, list[float]] = {trial.number: [] for trial in chosen}
    for run in runs:
        if run.error is not None and not isinstance(run.error, loop.NonFiniteLossError):
            raise run.error
        values[run.key].append(run.result.best_score if run.result else worst(cfg.tune.metric))
    for trial in chosen:
        each = values[trial.number]
        print(f"[tune] confirm trial {trial.number:>3}: {cfg.tune.metric} {statistics.mean(each):.4f} ± "
              f"{statistics.stdev(each):.4f} over {len(each)} seeds (its search value "
              f"{'pruned' if trial.value is None else f'{trial.value:.4f}'})", flush=True)
    return values
