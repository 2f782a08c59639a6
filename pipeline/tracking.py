"""MLflow tracking: every MLflow call of the pipeline lives here.

One run per training (and per trial, nested under its study's run). Runs are
driven through `MlflowClient` by id, never through MLflow's process-global
"active run", so a process can hold several at once and a resumed training
continues its own run. The loop never imports this module: `RunMetrics` plugs
into its callback hooks.

The store defaults to `sqlite:///<repo>/mlflow.db` resolved to an absolute
path, so `dvc repro`, `dvc exp run` and queued experiments (which DVC runs in
copies under .dvc/tmp/) all write to the same database.

What a run shows must be true:
- params and artifacts carry no secrets (`Config.public`, `redact`);
- `git.dirty` says whether the pipeline's code or params differ from the commit
  (DVC rewrites tracked outputs while it runs, so those do not count);
- a run orphaned by a killed process is closed (KILLED, with a reason) the
  next time a process of this machine connects to the store;
- evaluation adds its test metrics to the training run without re-opening it,
  so the run's duration stays its training time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import files, paths, processes
from pipeline.config import Config, TrackingConfig, flatten
from pipeline.errors import UserError, first_line, redact
from pipeline.loop import Callback
from pipeline.metrics import EpochMetrics, NAMES, is_better

# Code and params a run depends on: only changes to these make its `git.dirty` tag true.
SOURCE_PATHS = ("pipeline", "params.yaml", "dvc.yaml", "pyproject.toml")
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
BEST_ALIAS = "best"
WEIGHTS = "weights"  # key of the weights file among a logged model's artifacts (see serving.py)
SERVING_CODE = Path(__file__).with_name("serving.py")  # the model's code, MLflow's "models from code"
ORPHAN_REASON = "pipeline.end_reason"
PROCESS_TAG = "pipeline.process"  # host:pid:start time of the process that holds the run open

_checked: set[str] = set()  # stores this process has connected to (schema, reachability, orphans)


# ---------------------------------------------------------------- the store

def tracking_uri(cfg: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI (MLflow's own variable) > tracking.uri > sqlite:///<repo>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri or paths.default_mlflow_uri()


def connect(cfg: TrackingConfig) -> MlflowClient:
    """A client for the store; the first connection of a process checks it and closes orphaned runs."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in stage logs
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run (and trial)
    # "Creating initial tables..." and, per logged model, "Validating input example against model signature"
    for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.pyfunc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    if uri not in _checked:
        _check_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    if uri not in _checked:
        _checked.add(uri)
        close_orphaned_runs(client)
    return client


def _check_store(uri: str) -> None:
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in SCHEMES:
        raise UserError(f"tracking URI {redact(uri)!r}: unsupported scheme {scheme or '(none)'!r}; use "
                        "sqlite:///path/mlflow.db, postgresql://…, or http(s):// for an MLflow server")
    if scheme == "sqlite":
        _create_sqlite_schema_once(Path(uri.removeprefix("sqlite:///")))
    elif scheme in ("http", "https"):
        _probe_server(uri)
    else:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except (MlflowException, ImportError, OSError) as err:
            raise UserError(f"cannot use MLflow store {redact(uri)}: {redact(first_line(err))}") from None


def _create_sqlite_schema_once(db: Path) -> None:
    # Parallel first use of a new SQLite store races on the schema migration ("duplicate column").
    from filelock import FileLock

    if not db.parent.is_dir():
        raise UserError(f"MLflow store {db}: folder {db.parent} does not exist; create it or fix the tracking URI")
    _check_sqlite_file(db)
    with FileLock(f"{db}.lock"):
        MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)


def _check_sqlite_file(db: Path) -> None:
    """An existing store that is no SQLite database, or a damaged one, is named before anything touches it (MLflow
    would answer with a traceback from deep inside its schema check)."""
    import sqlite3

    if not db.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            verdict = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.OperationalError:  # busy or locked by a writer: a live store, not a broken one
        return
    except sqlite3.DatabaseError as err:  # "file is not a database", "database disk image is malformed"
        verdict = str(err)
    if verdict != "ok":
        raise UserError(f"MLflow store {db} is not a readable SQLite database ({verdict}): move it aside (it is "
                        "nothing DVC tracks) and run again to start a new store")


def _probe_server(uri: str) -> None:
    """Fail in seconds, naming the server, instead of MLflow's minutes of retries and a traceback."""
    parts = urlsplit(uri)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if "@" in parts.netloc:  # user:password@host, which MLflow's client (requests) uses as basic auth too
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(urlunsplit(parts).rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user and password:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise UserError(f"MLflow server {redact(uri)} refused the credentials (HTTP {err.code}): set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a valid user") from None
        raise UserError(f"MLflow server {redact(uri)} answered HTTP {err.code}: is it an MLflow tracking "
                        "server?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"MLflow server {redact(uri)} does not answer ({reason}): start it, or fix "
                        "tracking.uri / MLFLOW_TRACKING_URI") from None


# The experiment tag MLflow's UI reads to choose an experiment's default view: a model-training experiment opens
# on its runs and their metrics, not on the GenAI "Overview" of traces and evaluations.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment, marked as model training (EXPERIMENT_KIND); a local store keeps its artifacts
    under <repo>/mlartifacts/<name>."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        local = urlsplit(client.tracking_uri).scheme.split("+")[0] not in ("http", "https", "databricks")
        location = (paths.default_mlflow_artifacts() / name).as_uri() if local else None  # a server serves its own
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another worker created it first
            experiment = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():  # an experiment a store had before
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def runs_page(cfg: Config, base_url: str) -> str | None:
    """The MLflow UI's page of this project's models (its experiment's run table, one row per model run, seed
    replicates and trials folded away), best test accuracy first; None before the first run."""
    from urllib.parse import quote, urlencode

    experiment = connect(cfg.tracking).get_experiment_by_name(cfg.tracking.experiment or cfg.data.name)
    if not experiment:
        return None
    view = urlencode({"searchFilter": "tags.`pipeline.level` = 'model'", "orderByKey": "metrics.`test_accuracy`",
                      "orderByAsc": "false"}, quote_via=quote)
    return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?{view}"


# ---------------------------------------------------------------- processes and orphans

def close_orphaned_runs(client: MlflowClient) -> list[str]:
    """End runs left RUNNING by a process of this machine that no longer exists (SIGKILL, power loss)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    closed = []
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        owner = run.data.tags.get(PROCESS_TAG, "")
        if processes.is_dead(owner):
            client.set_tag(run.info.run_id, ORPHAN_REASON, f"process {owner} ended without closing the run "
                                                           "(killed); closed by the next pipeline process")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left running by killed processes: {', '.join(closed)}",
              file=sys.stderr)
    return closed


def close_if_running(client: MlflowClient, run_id: str, reason: str) -> bool:
    """End a run that was left RUNNING (its process is known to be gone) as KILLED, saying why."""
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except MlflowException:
        return False
    client.set_tag(run_id, ORPHAN_REASON, reason)
    client.set_terminated(run_id, "KILLED")
    return True


# ---------------------------------------------------------------- lineage

def lineage_tags(cfg: Config, data_md5: str, role: str) -> dict[str, str]:
    """Everything needed to trace a number back to its code, data and environment."""
    import torch

    tags = {
        "pipeline.role": role,
        "pipeline.config_fingerprint": cfg.fingerprint(),
        "data.name": cfg.data.name,
        "data.md5": data_md5,
        "torch.version": torch.__version__,
        "torch.cuda": torch.version.cuda or "none",
        "device": cfg.train.device,
        "python.version": platform.python_version(),
        "mlflow.source.name": redact("python -m pipeline " + " ".join(sys.argv[1:])),
        "mlflow.source.type": "LOCAL",
    }
    commit, dirty = git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(dirty).lower()
    dvc_md5 = _dvc_locked_md5(str(paths.PREPARED_DIR))
    if dvc_md5:
        tags["dvc.data.md5"] = dvc_md5
    for variable, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_STAGE", "dvc.stage"),
                          ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def git_state() -> tuple[str | None, bool]:
    """(HEAD commit, whether the pipeline's code or params differ from it), or (None, False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


def _dvc_locked_md5(path: str) -> str | None:
    """The hash DVC recorded for `path` in dvc.lock, if this is a DVC repo that has run it."""
    lock = Path("dvc.lock")
    try:
        stat = lock.stat()
    except FileNotFoundError:
        return None
    return _locked_outs(lock.resolve(), stat.st_mtime_ns, stat.st_size).get(path)


@functools.lru_cache(maxsize=4)
def _locked_outs(lock: Path, mtime_ns: int, size: int) -> dict[str, str]:
    """{out path: md5} of a dvc.lock version: a search tags every trial's run, and parsing the file each time
    cost ~40 ms per run (~1 s per search); its stat is the cache key, so an edited lock is read again."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: ~7x faster
    outs = {}
    for stage in (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            outs.setdefault(out.get("path"), out.get("md5"))
    return outs


# ---------------------------------------------------------------- runs

class RunMetrics(Callback):
    """Per-epoch metrics with step=epoch, sent in batches, each epoch exactly once.

    A synchronous `log_metric` costs ~6 ms on SQLite; one `log_batch` every
    `flush_every_s` seconds (and at the end) keeps tracking off the hot path.
    A resumed run first sends the epochs its killed predecessor had not flushed.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float):
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.seconds_spent = 0.0  # measured tracking overhead, reported in the run

    def on_fit_start(self, model, history: list[EpochMetrics]) -> None:
        if history:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
            for m in history:
                if m.epoch not in logged:
                    self.on_epoch_end(m)

    def on_epoch_end(self, m: EpochMetrics) -> None:
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
            name = self.cfg.tracking.experiment or self.cfg.data.name
            run = self.client.create_run(experiment_id(self.client, name), run_name=self.name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(key, str(value)) for key, value in flatten(self.cfg.public()).items()]
            for start in range(0, len(params), 100):  # log_batch takes up to 100 params
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.metrics = RunMetrics(self.client, self.run_id, self.cfg.tracking.flush_every_s)
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
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(self.cfg.public(), sort_keys=False), "config.yaml")

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


# ---------------------------------------------------------------- after training

def log_test_results(cfg: Config, run_name: str, model_file: Path, metrics: dict[str, float],
                     artifacts: list[Path], level: str = "model") -> None:
    """Attach test metrics and reports to the latest `run_name` run that produced exactly `model_file` (found by
    its MD5), and to that run's registry versions. `level`: the model's run, or one of its seed replicates' (the
    shipped replicate's file is the model's). Warns instead of failing when there is no such run."""
    client = connect(cfg.tracking)
    md5 = files.file_digest(model_file)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment or cfg.data.name)
    query = (f"tags.`model.md5` = '{md5}' and tags.`pipeline.role` = '{run_name}' "
             f"and tags.`pipeline.level` = '{level}'")
    runs = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=1) if experiment else []
    if not runs:
        print(f"warning: no MLflow run in {redact(tracking_uri(cfg.tracking))} produced {model_file} "
              f"(md5 {md5}); test metrics not logged", file=sys.stderr)
        return
    run_id = runs[0].info.run_id
    now = int(time.time() * 1000)
    test = {f"test_{key}": float(value) for key, value in metrics.items()}
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in test.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key, value in test.items():
            client.set_model_version_tag(version.name, version.version, key, str(value))


def fetch_run(cfg: Config, run_id: str) -> tuple[str, dict[str, str], dict[str, float]]:
    """(config.yaml text, tags, metrics) of a logged run, for `reproduce`."""
    client = connect(cfg.tracking)
    try:
        run = client.get_run(run_id)
        logged = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except MlflowException as err:
        raise UserError(f"cannot reproduce run {run_id} from {redact(tracking_uri(cfg.tracking))}: "
                        f"{redact(first_line(err))}") from None
    return logged, run.data.tags, run.data.metrics


def logged_predictions(cfg: Config, source: str, dest: Path) -> tuple[Path, str, int | None]:
    """The test predictions `evaluate` logged for an MLflow run id or a registered model (models:/NAME@ALIAS,
    models:/NAME/VERSION): (the downloaded predictions.npz, the run's name, and for a seed replicate's run its
    index in that file, which its model's run holds)."""
    client = connect(cfg.tracking)
    try:
        if source.startswith("models:/"):
            name, _, version = source.removeprefix("models:/").partition("/")
            name, _, alias = name.partition("@")
            model = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name,
                                                                                                          version)
            source = model.run_id
        run = client.get_run(source)
        tags = run.data.tags
        replicate = tags.get("pipeline.level") == "replicate"
        holder = tags["mlflow.parentRunId"] if replicate else run.info.run_id
        local = mlflow.artifacts.download_artifacts(run_id=holder, artifact_path=paths.PREDICTIONS,
                                                    dst_path=str(dest))
    except (MlflowException, OSError) as err:
        raise UserError(f"cannot read the test predictions of {source} from {redact(tracking_uri(cfg.tracking))}: "
                        f"{redact(first_line(err))} (only runs evaluated by `evaluate` have them)") from None
    name = run.info.run_name + (f" (seed {tags.get('replicate.seed')})" if replicate else "")
    return Path(local), name, int(tags["replicate.index"]) if replicate else None


def download_model_file(cfg: Config, model_uri: str, dest: Path) -> Path:
    """The weights file of an MLflow model (e.g. models:/digits-cnn/1 or models:/digits-cnn@best), downloaded
    without loading the model through MLflow: nothing in the store is unpickled or executed."""
    connect(cfg.tracking)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    except (MlflowException, OSError) as err:
        raise UserError(f"cannot load model {model_uri}: {redact(first_line(err))}") from None
    weights = _weights_file(local)
    if weights is None:
        raise UserError(f"{model_uri} holds no weights file: it was not logged by this pipeline")
    return weights


def _weights_file(model_dir: Path) -> Path | None:
    """The weights file inside a downloaded model folder, as its MLmodel file names it (read as plain YAML)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    entry = (((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}).get(WEIGHTS)
    if not isinstance(entry, dict) or not entry.get("path"):
        return None
    path = model_dir / str(entry["path"])
    return path if path.is_file() and path.resolve().is_relative_to(model_dir.resolve()) else None


def ui_command(cfg: Config, port: int) -> list[str]:
    uri = tracking_uri(cfg.tracking)
    connect(cfg.tracking)  # creates a missing SQLite schema, fails fast on a dead server
    return [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port)]
