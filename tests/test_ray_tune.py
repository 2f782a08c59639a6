"""tune.engine: ray — Ray Tune runs the trials of the pipeline's own study (a local Ray here, as on a cluster)."""

import json
import statistics

import mlflow
import pytest
from optuna.trial import TrialState

from helpers import edit_params, run_cli
from helpers.searches import CONTINUOUS, load_only_study

pytestmark = pytest.mark.slow


def test_ray_tune_runs_exactly_the_trials_of_the_study_and_records_them_as_the_optuna_engine_does(
        search_repo, tracked_env):
    repo, storage = search_repo
    edit_params(repo, {"tune.engine": "ray", "tune.n_trials": 4, "tune.space": CONTINUOUS})
    result = run_cli("tune", cwd=repo, env=tracked_env)
    assert result.returncode == 0, result.stdout + result.stderr
    study = load_only_study(storage)
    assert len(study.trials) == 4 and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert study.trials[0].user_attrs["origin"] == "params.yaml"  # the untuned settings first, as ever
    lines = [line for line in result.stdout.splitlines() if line.startswith("[tune] trial")]
    assert sorted(int(line.split()[2]) for line in lines) == [0, 1, 2, 3] and all(" on Ray" in l for l in lines)

    client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = {int(run.data.tags["optuna.trial"]): run for run in client.search_runs(
        [client.get_run(parent).info.experiment_id], "tags.`pipeline.role` = 'trial'")}
    assert sorted(runs) == [0, 1, 2, 3]
    window = 3  # train.monitor_window
    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                         key=lambda m: m.step)]
        # every epoch it trained is in the study, and its value is the one the Optuna engine records: the best
        # mean of val_loss over `window` epochs ending at an epoch (loop.smoothed)
        assert max(trial.intermediate_values) == len(curve) <= 3
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(min(statistics.fmean(curve[max(0, e - window):e])
                                                    for e in range(1, len(curve) + 1)), rel=1e-9)
    best = json.loads((repo / "reports/tune/best_params.json").read_text())
    assert best["trial"] == study.best_trial.number and set(best["params"]) == {"train.lr", "model.dropout"}
