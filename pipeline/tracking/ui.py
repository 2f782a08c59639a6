"""MLflow's UI for this project: the command that serves it, and the page of its models it opens on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.tracking.store import connect, tracking_uri


# MLflow's server starts job runners (huey consumers: one process each, importing MLflow) for GenAI jobs this
# pipeline never submits; they double the server's processes and its start-up CPU.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def command(cfg: Config, port: int) -> list[str]:
    """`mlflow ui` on 127.0.0.1 against this project's store (its schema created, a dead server named first)."""
    uri = tracking_uri(cfg.tracking)
    connect(cfg.tracking)  # creates a missing SQLite schema, fails fast on a dead server
    return [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port)]


# The UI keeps the columns a person picks in the browser, and a link's query string carries only the search and
# sort; a shared view (what the UI's "Share" button saves: an experiment tag holding the view's state) carries
# the columns too.
SHARED_VIEW = "mlflow.sharedViewState."
MODELS_VIEW = "pipeline-models"


def models_view(metrics: list[str]) -> dict:
    """The view `make ui` links to: one row per model run (seed replicates and trials folded away), best test
    accuracy first, with these test metrics (names as `evaluate` logs them, without `test_`) as columns."""
    return {"searchFilter": "tags.`pipeline.level` = 'model'", "orderByKey": "metrics.`test_accuracy`",
            "orderByAsc": False,
            "selectedColumns": [f"metrics.`test_{name}`" for name in metrics]}


def runs_page(cfg: Config, base_url: str, metrics: list[str]) -> str | None:
    """The MLflow UI's page of this project's models (`models_view`, saved as the experiment's shared view);
    None before the first run."""
    client = connect(cfg.tracking)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if not experiment:
        return None
    client.set_experiment_tag(experiment.experiment_id, SHARED_VIEW + MODELS_VIEW, json.dumps(models_view(metrics)))
    return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={MODELS_VIEW}"
