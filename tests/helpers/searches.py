"""Small searches and ways to look at their studies, shared by the tuning tests."""

import optuna
from optuna.trial import TrialState

# lr 1e-6 learns nothing, so the pruner has something to prune. No confirmation over seeds after the trials: these
# searches test the trials (counts, workers, storages, kills); test_tuning and test_fresh_clone test confirming.
TINY_SEARCH = {"comparison": ["logreg"], "model.name": "mlp", "tune.epochs": 3, "tune.startup_trials": 2,
               "tune.warmup_epochs": 1, "tracking.log_models": False, "tune.confirm": 0,
               "tune.space": {"train.lr": {"choices": [1.0e-6, 3.0e-3]}, "model.dropout": {"low": 0.0, "high": 0.3}}}
CONTINUOUS = {"train.lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}, "model.dropout": {"low": 0.0, "high": 0.5}}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_for(kind, folder):
    return f"sqlite:///{folder / 'optuna.db'}" if kind == "sqlite" else str(folder / "optuna.journal")


def opened(storage):
    if "://" in storage:
        return storage
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))


def load_only_study(storage):
    name, = optuna.get_all_study_names(opened(storage))
    return optuna.load_study(study_name=name, storage=opened(storage))


def states(study):
    return [t.state for t in study.trials]
