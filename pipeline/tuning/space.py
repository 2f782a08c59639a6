"""The search space: what a trial's params are, as Optuna samples them and as the config takes them."""

from __future__ import annotations

import json
from typing import Any

import optuna

from pipeline import population
from pipeline.config import Config, SearchDimension


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    values = {}
    for key, dim in space.items():
        if dim.choices is not None:
            if scalar_choices(dim):
                values[key] = trial.suggest_categorical(key, dim.choices)
            else:  # Optuna's categoricals are scalars; lists (e.g. layer widths) travel as JSON
                values[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in dim.choices]))
        elif dim.is_int:
            values[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def shared_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params (as Optuna holds them) that trials training together must share: every searched param but those
    a fused run may have of its own (`population.own_per_run`). The others (the model and its widths, the batch
    size, the precision) fix tensor shapes or kernels: trials differing in them would take turns, not share a
    forward pass."""
    return {key: value for key, value in params.items() if not population.own_per_run(key)}


def scalar_choices(dim: SearchDimension) -> bool:
    return all(isinstance(c, (str, int, float, bool, type(None))) for c in dim.choices)


def decoded_params(trial: optuna.trial.FrozenTrial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    return decode(trial.params, space)


def decode(params: dict[str, Any], space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Params as Optuna holds them (list choices as JSON) as the config takes them."""
    return {key: value if _scalar_choices_or_range(space[key]) else json.loads(value) for key, value in params.items()}


def _scalar_choices_or_range(dim: SearchDimension) -> bool:
    return dim.choices is None or scalar_choices(dim)


def default_params(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """(the searched params' values in params.yaml as Optuna spells them, the keys whose value lies outside
    the space); the defaults make a trial only when nothing lies outside."""
    values, outside = {}, []
    for key, dim in cfg.tune.space.items():
        value = cfg.value(key)
        if dim.choices is not None:
            values[key] = value if scalar_choices(dim) else json.dumps(value)
            inside = value in dim.choices
        else:
            values[key] = value
            inside = dim.low <= value <= dim.high
        if not inside:
            outside.append(key)
    return values, outside
