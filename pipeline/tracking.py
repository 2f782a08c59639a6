"""MLflow tracking: one run per training, lineage tags, batched metric logging.

The training loop never imports this module; `MlflowMetrics` plugs into its
callback hooks. The store defaults to `sqlite:///<repo>/mlflow.db` resolved to
an absolute path, so `dvc repro`, `dvc exp run` and queued experiments (which
DVC runs in copies under .dvc/tmp/) all write to the same database.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.config import Config, TrackingConfig
from pipeline.loop import Callback, EpochMetrics

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


def project_root() -> Path:
    """The DVC repo the user works in; DVC points DVC_ROOT at it even inside queued-experiment copies."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(cfg: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI (MLflow's own variable) > tracking.uri > sqlite:///<repo>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def connect(cfg: TrackingConfig) -> MlflowClient:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in stage logs
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        _create_sqlite_schema_once(Path(uri.removeprefix("sqlite:///")))
    return MlflowClient(uri)


def _create_sqlite_schema_once(db: Path) -> None:
    # Parallel first use of a new SQLite store races on the schema migration ("duplicate column").
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)


def experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment, with its artifacts under <repo>/mlartifacts/<name>."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(project_root() / "mlartifacts" / name).as_uri())
    except mlflow.exceptions.MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


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
        "mlflow.source.name": "python -m pipeline " + " ".join(sys.argv[1:]),
    }
    commit, dirty = _git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(dirty).lower()
    dvc_md5 = _dvc_locked_md5("data/prepared")
    if dvc_md5:
        tags["dvc.data.md5"] = dvc_md5
    for variable, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_STAGE", "dvc.stage"),
                          ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def _git_state() -> tuple[str | None, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


def _dvc_locked_md5(path: str) -> str | None:
    """The hash DVC recorded for `path` in dvc.lock, if this is a DVC repo that has run it."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return None
    import yaml

    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


class MlflowMetrics(Callback):
    """Per-epoch metrics with step=epoch, sent in batches.

    A synchronous `log_metric` costs ~6 ms on SQLite; one `log_batch` every
    `flush_every_s` seconds (and at the end) keeps tracking off the hot path.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float):
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.seconds_spent = 0.0  # measured tracking overhead, reported in the run

    def on_epoch_end(self, m: EpochMetrics) -> None:
        now = int(time.time() * 1000)
        values = {name: getattr(m, name) for name in EPOCH_METRICS}
        values |= {"epoch_seconds": m.seconds, "samples_per_s": m.samples_per_s}
        self.pending += [Metric(key, float(value), now, m.epoch) for key, value in values.items()]
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
    """One MLflow run as a context manager.

    Ends FINISHED on success (or an exception in `finished_on`), KILLED on KeyboardInterrupt (SIGINT, and SIGTERM
    which the CLI turns into one), FAILED on any other exception: never RUNNING.
    """

    def __init__(self, cfg: Config, run_name: str, tags: dict[str, str], run_id: str | None = None,
                 parent_run_id: str | None = None, finished_on: tuple[type[BaseException], ...] = ()):
        self.cfg, self.run_name, self.tags, self.finished_on = cfg, run_name, tags, finished_on
        self.resume_run_id, self.parent_run_id = run_id, parent_run_id
        self.client = connect(cfg.tracking)
        self.run_id = ""
        self.metrics: MlflowMetrics | None = None

    def __enter__(self) -> TrackedRun:
        if self.resume_run_id:
            run = mlflow.start_run(run_id=self.resume_run_id)
        else:
            name = self.cfg.tracking.experiment or self.cfg.data.name
            run = mlflow.start_run(experiment_id=experiment_id(self.client, name), run_name=self.run_name,
                                   tags=self.tags, nested=self.parent_run_id is not None,
                                   parent_run_id=self.parent_run_id,
                                   log_system_metrics=self.cfg.tracking.system_metrics)
            mlflow.log_params(self.cfg.flat())
        self.run_id = run.info.run_id
        self.metrics = MlflowMetrics(self.client, self.run_id, self.cfg.tracking.flush_every_s)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.metrics.flush()  # a killed run keeps the curves it had
        finally:
            if exc_type is None or issubclass(exc_type, self.finished_on):  # e.g. a pruned trial
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
            else:
                status = "FAILED"
                mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:5000])
            mlflow.end_run(status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, *paths: Path, folder: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path=folder)

    def log_config(self) -> None:
        import yaml

        mlflow.log_text(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False), "config.yaml")

    def log_model(self, classifier, example, registered_name: str | None) -> str:
        """Log the model (signature + input example) and optionally register it; returns its URI."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        import pipeline

        with torch.no_grad():
            signature = infer_signature(example, classifier(torch.from_numpy(example)).numpy())
        info = mlflow.pytorch.log_model(
            classifier, name="model", signature=signature, input_example=example,
            registered_model_name=registered_name,
            # pickle keeps the wrapper's classes/input_shape (a torch.export program drops them);
            # its code travels along, so the model loads without this repo
            serialization_format="pickle", code_paths=[str(Path(pipeline.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # skips slow requirement inference
        )
        return info.model_uri
