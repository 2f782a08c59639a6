"""MLflow tracking: every MLflow call of the pipeline lives in this package.

One run per training (and per trial, nested under its study's run). Runs are
driven through `MlflowClient` by id, never through MLflow's process-global
"active run", so a process can hold several at once and a resumed training
continues its own run. The loop never imports this package: `RunMetrics` plugs
into its callback hooks.

The store defaults to `sqlite:///<repo>/mlflow.db` resolved to an absolute
path, so `dvc repro`, `dvc exp run` and queued experiments (which DVC runs in
copies under .dvc/tmp/) all write to the same database.

Read it in this order: `store` (which store, checked once per process, its
experiments and UI, runs orphaned by killed processes), `lineage` (the tags
that trace a number to its code, data and environment), `runs` (one run
around a training or trial, its metrics and model), `results` (test results
onto the training run; runs, predictions and models read back); and `ui`
(`make ui`'s MLflow server and the page of models it opens on), which no
stage imports.

What a run shows must be true:
- params and artifacts carry no secrets (`Config.public`, `redact`);
- `git.dirty` says whether the pipeline's code or params differ from the commit
  (DVC rewrites tracked outputs while it runs, so those do not count);
- a run orphaned by a killed process is closed (KILLED, with a reason) the
  next time a process of this machine connects to the store;
- evaluation adds its test metrics to the training run without re-opening it,
  so the run's duration stays its training time.
"""

from pipeline.tracking.lineage import git_state, lineage_tags
from pipeline.tracking.results import download_model_file, fetch_run, log_test_results, logged_predictions
from pipeline.tracking.runs import (BEST_ALIAS, SERVING_CODE, WEIGHTS, RunMetrics, TrackedRun, child_runs,
                                    close_running_children, log_lr_find, mark_best_version, run_exists)
from pipeline.tracking.store import (EXPERIMENT_KIND, ORPHAN_REASON, PROCESS_TAG, close_orphaned_runs, connect,
                                     experiment_id, tracking_uri)

__all__ = ["BEST_ALIAS", "EXPERIMENT_KIND", "ORPHAN_REASON", "PROCESS_TAG", "SERVING_CODE", "WEIGHTS", "RunMetrics",
           "TrackedRun", "child_runs", "close_orphaned_runs", "close_running_children", "connect",
           "download_model_file", "experiment_id", "fetch_run", "git_state", "lineage_tags", "log_lr_find",
           "log_test_results", "logged_predictions", "mark_best_version", "run_exists", "tracking_uri"]
