"""tune.engine: ray — Ray Tune runs the trials of the pipeline's own study (a local Ray here, as on a cluster)."""

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import mlflow
import pytest
from optuna.trial import TrialState

from helpers import edit_params, run_cli
from helpers.searches import CONTINUOUS, load_only_study

pytestmark = pytest.mark.slow
EPOCHS = 12  # of each trial in the lost-node search


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


def test_a_node_lost_mid_search_restarts_its_trial_from_its_checkpoint_and_leaves_no_run_running(
        search_repo, tracked_env):
    from ray.cluster_utils import Cluster

    from pipeline.tracking import PROCESS_TAG
    from pipeline.tuning.ray_engine import RAY_NODE, RAY_TRIAL, RESTORED

    repo, storage = search_repo
    # two nodes on this machine, a trial on each; the GCS notices a lost node within a couple of seconds
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    worker = cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        edit_params(repo, {"tune.engine": "ray", "tune.n_trials": 4, "tune.space": CONTINUOUS, "tune.epochs": EPOCHS,
                           "tune.warmup_epochs": EPOCHS, "tune.ray_address": cluster.address})
        client = mlflow.MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
        said = (repo.parent / "tune.stderr").open("w+")  # Ray's node logs can fill a pipe no one reads yet
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "tune"], cwd=repo, text=True,
                                   env={**os.environ, **tracked_env}, stdout=subprocess.PIPE, stderr=said)
        lost = None
        deadline = time.monotonic() + 180
        while lost is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          f"tags.`{RAY_NODE}` = '{worker.node_id}' and attributes.status = 'RUNNING'"):
                # a checkpoint, and 4 epochs or more still to train: the trial has epochs to lose (a poll under
                # load takes a while: the window is wide)
                taken = list((repo / "ray_results").glob(f"*/*{run.data.tags[RAY_TRIAL]}*/checkpoint_*"))
                if taken and max(int(path.name.split("_")[1]) for path in taken) + 1 <= EPOCHS - 4:
                    lost = run
        assert lost is not None, "no trial trained an epoch on the worker node"
        # the node goes: its raylet, and the trial's worker process with it (a worker outlives its raylet a while)
        cluster.remove_node(worker, allow_graceful=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(lost.data.tags[PROCESS_TAG].split(":")[1]), signal.SIGKILL)
        out, _ = process.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert process.returncode == 0, out + (repo.parent / "tune.stderr").read_text()[-5000:]
    number = lost.data.tags["optuna.trial"]
    assert re.search(rf"^\[tune\] trial +{number} RESTART", out, re.M), out
    study = load_only_study(storage)
    assert len(study.trials) == 4 and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    runs = client.search_runs([lost.info.experiment_id], "tags.`pipeline.role` = 'trial'")
    assert sorted(int(run.data.tags["optuna.trial"]) for run in runs) == [0, 1, 2, 3]  # the lost one continued
    assert all(run.info.status == "FINISHED" for run in runs)
    restarted = client.get_run(lost.info.run_id)
    assert restarted.data.tags[RAY_NODE] != worker.node_id  # it ended on the head node
    assert int(restarted.data.tags[RESTORED]) >= 1  # from its checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(lost.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(1, study.trials[int(number)].last_step + 1))  # each epoch once
