"""One MLflow run around a training (or trial): its params, tags, per-epoch metrics, artifacts and model."""

from __future__ import annotations

import contextlib
import math
import sys
import time
import traceback
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import files, processes
from pipeline.config import Config, flatten
from pipeline.errors import first_line, redact
from pipeline.loop import Callback
from pipeline.metrics import NAMES, EpochMetrics, is_better
from pipeline.tracking.lineage import lineage_tags
from pipeline.tracking.store import ORPHAN_REASON, PROCESS_TAG, close_if_running, connect, experiment_id

BEST_ALIAS = "best"
WEIGHTS = "weights"  # key of the weights file among a logged model's artifacts (see serving.py)
SERVING_CODE = Path(__file__).parent.parent / "serving.py"  # the model's code, MLflow's "models from code"


class RunMetrics(Callback):
    """Per-epoch metrics with step=epoch, sent in batches, each epoch exactly once.

    A synchronous `log_metric` costs ~6 ms on SQLite; one `log_batch` every
    `flush_every_s` seconds (and at the end) keeps tracking off the hot path.
    A resumed run first sends the epochs its killed predecessor had not flushed,
    and skips those it had sent beyond its resume point (a Ray trial's
    checkpoint is taken after the epoch's metrics went out).
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float, continued: bool = False):
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.continued = continued
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.seconds_spent = 0.0  # measured tracking overhead, reported in the run
        self.logged: set[int] = set()  # epochs a continued run already holds

    def on_fit_start(self, model, history: list[EpochMetrics]) -> None:
        if self.continued:
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        for m in history:
            self.on_epoch_end(m)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        if m.epoch in self.logged:
            return
        self.logged.add(m.epoch)
        now = int(time.time() * 1000)
        self.pending += [Metric(name, float(getattr(m, name)), now, m.epoch) for name in NAMES if name != "epoch"]
        if time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def on_fit_end(self, result) -> None:
        self.flush()

    def flush(self) -> None:
        tick = time.perf_counter()
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]  # log_batch takes up to 1000
            self.client.log_batch(self.run_id, metrics=batch)
        self.last_flush = time.monotonic()
        self.seconds_spent += time.perf_counter() - tick


class TrackedRun:
    """One MLflow run as a context manager: new, or continued by id (a resumed training, a study's parent).

    Ends FINISHED on success (or an exception in `finished_on`, e.g. a pruned
    trial), KILLED on KeyboardInterrupt (SIGINT, and SIGTERM which the CLI turns
    into one), FAILED on any other exception: never RUNNING.
    """

    def __init__(self, cfg: Config, name: str, role: str, data_md5: str, continue_run_id: str | None = None,
                 parent_run_id: str | None = None, finished_on: tuple[type[BaseException], ...] = (),
                 tags: dict[str, str] | None = None, own_process: bool = True):
        self.cfg, self.name, self.role, self.data_md5 = cfg, name, role, data_md5
        self.continue_run_id, self.parent_run_id, self.finished_on = continue_run_id, parent_run_id, finished_on
        self.extra_tags, self.own_process = dict(tags or {}), own_process
        self.client = connect(cfg.tracking)
        self.run_id = ""
        self.metrics: RunMetrics | None = None
        self.closing_tags: dict[str, str] = {}  # written as the run closes, with its end state
        self._system = None

    def __enter__(self) -> TrackedRun:
        process = {PROCESS_TAG: processes.identity()} if self.own_process else {}
        if self.continue_run_id and run_exists(self.client, self.continue_run_id):
            self.run_id = self.continue_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in {**process, **self.extra_tags}.items()])
            if ORPHAN_REASON in self.client.get_run(self.run_id).data.tags:  # it lives again
                self.client.delete_tag(self.run_id, ORPHAN_REASON)
        else:
            tags = {**lineage_tags(self.cfg, self.data_md5, self.role), **process, **self.extra_tags}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            name = self.cfg.experiment
            run = self.client.create_run(experiment_id(self.client, name), run_name=self.name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(key, str(value)) for key, value in flatten(self.cfg.public()).items()]
            for start in range(0, len(params), 100):  # log_batch takes up to 100 params
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.metrics = RunMetrics(self.client, self.run_id, self.cfg.tracking.flush_every_s,
                                  continued=self.run_id == self.continue_run_id)
        if self.cfg.tracking.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, tracking_uri=self.client.tracking_uri)
            self._system.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, self.finished_on):
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if tb is not None:
            # An interrupt (Ctrl-C, SIGTERM) can land in the middle of a store query: the frames it unwound still
            # hold that query's open SQLite statement, whose read lock would make every write below wait and fail
            # ("database is locked"). Their locals are of no further use; the traceback still prints.
            traceback.clear_frames(tb)
        try:
            try:
                self.metrics.flush()  # a killed run keeps the curves it had
                if self._system is not None:
                    self._system.finish()
            finally:
                tags = dict(self.closing_tags)
                if status == "FAILED":
                    tags["error"] = redact(f"{exc_type.__name__}: {exc}")[:5000]
                if tags:
                    self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
                self.client.set_terminated(self.run_id, status)
        except MlflowException as err:
            if exc_type is None:
                raise
            # the run's own error (or interrupt) is the one to report; the next pipeline process closes this run
            print(f"[mlflow] run {self.run_id} could not be closed as {status}: {redact(first_line(err))}",
                  file=sys.stderr, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, object]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, *files: Path, folder: str | None = None) -> None:
        for path in files:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_config(self) -> None:
        self.client.log_text(self.run_id, self.cfg.public_yaml(), "config.yaml")

    def log_model(self, model_file: Path, example, probabilities, registered_name: str | None,
                  selection: dict[str, float]) -> None:
        """Log `model_file` as an MLflow model (pyfunc from code, weights only: loading it never unpickles);
        tag the run with the file's MD5 (how `evaluate` finds this run); register it if asked.

        `selection`: the validation metrics the registry's `best` alias is chosen on.
        """
        import torch
        from mlflow.models import Model, infer_signature

        import pipeline

        self.set_tags({"model.md5": files.file_digest(model_file)})
        # The logged model belongs to the run's experiment (MLflow takes it from the process-global one).
        mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)
        info = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=self.run_id,
            python_model=str(SERVING_CODE), artifacts={WEIGHTS: str(model_file)},
            code_paths=[str(Path(pipeline.__file__).parent)],
            signature=infer_signature(example, probabilities), input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
        if registered_name:
            version = _register_quietly(info.model_uri, registered_name)
            for key, value in {**selection, "data.md5": self.data_md5, "run_id": self.run_id}.items():
                self.client.set_model_version_tag(registered_name, version, key, str(value))
            mark_best_version(self.client, registered_name, self.cfg.train.monitor, self.data_md5)


def _register_quietly(model_uri: str, name: str) -> str:
    """A new version of registered model `name`; MLflow's routine lines about it (the model exists, the version
    was created) would be two lines per stage run, so they are dropped and any other line goes on to stderr."""
    import io

    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        version = mlflow.register_model(model_uri, name).version
    routine = (f"Registered model {name!r} already exists.", f"Successfully registered model '{name}'.",
               f"Created version '{version}' of model '{name}'.")
    for line in said.getvalue().splitlines():
        if not line.startswith(routine):
            print(line, file=sys.stderr)
    return str(version)


def run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def log_lr_find(cfg: Config, name: str, data_md5: str, lrs: list[float], losses: list[float], reading: dict,
                folder: Path) -> str:
    """The range test as an MLflow run: per step its rate and smoothed loss (a diverged last value is left out:
    MLflow stores no infinities), the suggestion and the usable range, and `folder`'s curve and plot."""
    with TrackedRun(cfg, name, "lr_find", data_md5) as run:
        now = int(time.time() * 1000)
        low, high = reading["usable"]
        metrics = [Metric(key, value, now, step) for step, (lr, loss) in enumerate(zip(lrs, losses))
                   if math.isfinite(loss) for key, value in (("lr_find_lr", lr), ("lr_find_loss", loss))]
        metrics += [Metric(key, value, now, 0) for key, value in (
            ("lr_suggestion", reading["steepest"]), ("lr_usable_low", low), ("lr_usable_high", high))]
        run.metrics.pending += metrics
        run.metrics.flush()  # in batches log_batch takes
        run.client.log_artifacts(run.run_id, str(folder), "lr_find")
        return run.run_id


def child_runs(client: MlflowClient, parent_run_id: str, tag: str, values: list[str],
               running_only: bool = False) -> dict[str, str]:
    """The runs nested under `parent_run_id` whose `tag` is one of `values` (e.g. the Ray trial a restarted worker
    continues), oldest first: run id -> its `tag`."""
    if not values:
        return {}
    experiment = client.get_run(parent_run_id).info.experiment_id
    where = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if running_only:
        where += " and attributes.status = 'RUNNING'"
    runs = client.search_runs([experiment], where, max_results=50000, order_by=["attributes.start_time ASC"])
    wanted = set(values)
    return {run.info.run_id: run.data.tags[tag] for run in runs if run.data.tags.get(tag) in wanted}


def close_running_children(client: MlflowClient, parent_run_id: str, tag: str, reasons: dict[str, str]) -> list[str]:
    """Close as KILLED the RUNNING runs nested under `parent_run_id` whose `tag` is a key of `reasons`, each saying
    its value: runs whose process is gone, found by their own tag (their process may have died before it could
    record the run anywhere else). Returns the closed runs."""
    running = child_runs(client, parent_run_id, tag, list(reasons), running_only=True)
    return [run_id for run_id, value in running.items() if close_if_running(client, run_id, reasons[value])]

def mark_best_version(client: MlflowClient, name: str, metric: str, data_md5: str) -> str | None:
    """Point the `best` alias at the version with the best validation `metric` among versions trained on this
    data (validation, never test: the test split stays untouched by selection). Returns that version."""
    candidates = [v for v in client.search_model_versions(f"name = '{name}'")
                  if v.tags.get("data.md5") == data_md5 and metric in v.tags]
    if not candidates:
        return None
    best = candidates[0]
    for version in candidates[1:]:
        value, incumbent = float(version.tags[metric]), float(best.tags[metric])
        if is_better(metric, value, incumbent) or (value == incumbent and int(version.version) < int(best.version)):
            best = version
    client.set_registered_model_alias(name, BEST_ALIAS, best.version)
    return best.version
