"""The MLflow store: which one, checked once per process, its experiments, its UI, and runs orphaned by killed
processes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import paths, processes
from pipeline.config import TrackingConfig
from pipeline.errors import UserError, first_line, redact

SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
ORPHAN_REASON = "pipeline.end_reason"
PROCESS_TAG = "pipeline.process"  # host:pid:start time of the process that holds the run open

_checked: set[str] = set()  # stores this process has connected to (schema, reachability, orphans)


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
