"""The study a search works on: its name, sampler and pruner, and what every trial of one process shares.

Every process draws its own sampler seed from the study (`seed` for the first,
then a new stream per process), so workers and resumed searches propose new
params while a single-worker search stays reproducible.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from pipeline import data, devices
from pipeline.config import Config, TuneConfig, study_keys
from pipeline.tuning.space import default_params
from pipeline.tuning.storage import StudyLock, lock_url, open_storage

# the tags that name an MLflow run's study and trial: how a run is found from its trial, even one whose process
# died before it could record the run on the trial
STUDY_TAG, TRIAL_TAG = "optuna.study", "optuna.trial"


def study_name(cfg: Config, data_md5: str) -> str:
    """dataset-model-hash of the search's definition and its data: same search -> same study, so it resumes;
    other data -> another study (trials on other data must never pick the final model)."""
    searched = {key: cfg.value(key) for key in study_keys()}
    digest = hashlib.sha256(json.dumps([searched, data_md5], sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.name}-{cfg.model.name}-{digest}"


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    tune = cfg.tune
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=tune.startup_trials)
    if tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=tune.startup_trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=tune.epochs)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.warmup_epochs))
    return optuna.pruners.NopPruner()


def sampler_seed(seed: int, stream: int) -> int:
    """`seed` itself for the first process of a study; a distinct, derived seed for every later one."""
    if stream == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:4], "big")


@dataclass
class Search:
    """What every trial of one process shares: config, data on the device, the study and its MLflow parent."""

    cfg: Config
    prepared: data.PreparedData
    device: torch.device
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    lock: StudyLock
    study_id: int  # the study's id in `storage`, which trial ids are looked up by
    parent_run_id: str | None = None
    running: set[int] = field(default_factory=set)  # trial ids this process runs (heartbeats)
    population: int = 0  # trials trained at once: tune.population, halved each time the device runs out of memory

    def __post_init__(self):
        self.population = self.population or self.cfg.tune.population


def trial_run_name(study_name: str, number: int) -> str:
    """A trial's name in MLflow and TensorBoard."""
    return f"{study_name}-trial-{number:03d}"


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """What a trial with `params` trains: tune.epochs, judged on tune.metric, never resumed."""
    return cfg.with_overrides({**params, "train.epochs": cfg.tune.epochs, "train.monitor": cfg.tune.metric,
                               "train.resume": False})


def open_search(cfg: Config, prepared_dir: Path) -> Search:
    """Load (or create, once) the study; this process gets its own sampler stream."""
    device = devices.resolve_device(cfg.train.device)
    prepared = data.load_prepared(prepared_dir)
    where = lock_url(cfg.tune)  # a gRPC proxy without tune.lock is refused before anything is opened
    storage = open_storage(cfg.tune)
    name = study_name(cfg, prepared.md5)
    lock = StudyLock(where, name)
    with lock:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    direction=cfg.tune.direction)
        if not study.metric_names:
            study.set_metric_names([cfg.tune.metric])  # the dashboard's axis reads "val_loss", not "Objective 0"
        if not study.trials:
            # the untuned settings are trial 0: a search never hands over something worse on validation
            defaults, outside = default_params(cfg)
            if outside:
                print(f"[tune] params.yaml's {', '.join(outside)} lie outside tune.space: the untuned settings are "
                      "not a trial of this search", file=sys.stderr)
            else:
                study.enqueue_trial(defaults, user_attrs={"origin": "params.yaml"})
        stream = study.user_attrs.get("sampler_streams", 0)
        study.set_user_attr("sampler_streams", stream + 1)
    study.sampler = make_sampler(cfg, sampler_seed(cfg.seed, stream))
    study.pruner = make_pruner(cfg.tune)
    # data moved once per process, not per trial
    return Search(cfg, prepared.to(device), device, study, storage, lock, storage.get_study_id_from_name(name))
