"""After training: test results onto the training run, and runs, predictions and models read back."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline import files, paths
from pipeline.config import Config
from pipeline.errors import UserError, first_line, redact
from pipeline.tracking.runs import WEIGHTS
from pipeline.tracking.store import connect, tracking_uri


def log_test_results(cfg: Config, run_name: str, model_file: Path, metrics: dict[str, float],
                     artifacts: list[Path], level: str = "model") -> None:
    """Attach test metrics and reports to the latest `run_name` run that produced exactly `model_file` (found by
    its MD5), and to that run's registry versions. `level`: the model's run, or one of its seed replicates' (the
    shipped replicate's file is the model's). Warns instead of failing when there is no such run."""
    client = connect(cfg.tracking)
    md5 = files.file_digest(model_file)
    experiment = client.get_experiment_by_name(cfg.experiment)
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
