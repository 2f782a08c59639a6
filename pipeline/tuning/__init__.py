"""Optuna search through the shared training loop: every Optuna call of the pipeline lives in this package.

Read it in this order:

- `space`: what a trial's params are (suggest, decode, params.yaml's defaults);
- `storage`: where the study lives and what keeps it whole across processes
  and machines (locks, gRPC proxy, heartbeats, dead trials);
- `study`: the study this process works on, its sampler and pruner;
- `trials`: one trial around the loop, asked and told by ask/tell;
- `search`: populations of trials, worker processes, the `tune` stage;
- `ray_engine`: Ray Tune running the same study's trials instead
  (tune.engine: ray), on this machine or a Ray cluster;
- `confirm`: the best trials and the untuned settings retrained with several
  seeds, so that a lucky draw never ships;
- `reports`: best_params.json, trials.csv and Optuna's plots.

Untracked searches never import MLflow.
"""

import warnings

import optuna

from pipeline.tuning.search import run_worker, tune, work
from pipeline.tuning.space import suggest
from pipeline.tuning.storage import open_storage, storage_url
from pipeline.tuning.study import Search, open_search, trial_config

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us instead
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# `storage.heartbeats` does for ask/tell what Optuna's warning says only study.optimize does.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

__all__ = ["Search", "open_search", "open_storage", "run_worker", "storage_url", "suggest", "trial_config", "tune",
           "work"]
