"""Many machines, one study: a real PostgreSQL and a real MLflow server (basic auth, served artifacts).

"Machines" are separate checkouts in separate directories, each with its own TMPDIR, HOME and host name
(PIPELINE_HOSTNAME), sharing nothing but the PostgreSQL URL (password in a pgpass file) and the MLflow
server's URL and credentials, as separate machines would.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import copy_repo, edit_params, run_cli

pytestmark = pytest.mark.slow

N_TRIALS = 8
# cheap trials: the test is about the storage, the lock and the server, on a 2-core machine running 9 processes
# (and no confirmation over seeds after them: each machine would retrain the candidates; test_tuning tests it)
SEARCH = {"comparison": ["logreg"], "model.name": "mlp", "tune.epochs": 2, "tune.warmup_epochs": 2, "tune.confirm": 0,
          "tune.startup_trials": 2, "tune.n_trials": N_TRIALS, "tune.heartbeat_interval": 2, "tune.grace_period": 10,
          "tracking.log_models": False,
          "tune.space": {"train.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True},
                         "model.dropout": {"low": 0.0, "high": 0.5}}}


def machine(root: Path, name: str, services: dict, storage: str) -> tuple[Path, dict]:
    home = root / name
    repo = copy_repo(home / "repo")
    for folder in ("tmp", "home"):
        (home / folder).mkdir()
    edit_params(repo, {**SEARCH, "tune.storage": storage})
    env = {**services, "TMPDIR": str(home / "tmp"), "HOME": str(home / "home"), "PIPELINE_HOSTNAME": name}
    env.pop("OPTUNA_STORAGE")
    return repo, env


def trials(storage: str) -> list:
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).trials if names else []


def test_three_machines_two_workers_each_one_sigkill_exactly_n_trials(services, tmp_path, prepared_template):
    storage = services["OPTUNA_STORAGE"]
    os.environ["PGPASSFILE"] = services["PGPASSFILE"]  # this process reads the study too
    machines = [machine(tmp_path, f"machine-{i}", services, storage) for i in range(3)]
    for repo, _ in machines:  # the same data everywhere, as `dvc pull` from a shared remote would give
        shutil.copytree(prepared_template, repo / "data" / "prepared")
    logs = [(open(repo.parent / "tune.out", "w+"), open(repo.parent / "tune.err", "w+")) for repo, _ in machines]
    started = [subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--workers", "2"], cwd=repo,
                                env={**os.environ, **env}, stdout=out, stderr=err, text=True)
               for (repo, env), (out, err) in zip(machines, logs)]
    # SIGKILL the worker process of the first trial that runs: its machine's other processes see it die at once,
    # the other machines only through its missing heartbeats
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline:
        running = [t for t in trials(storage) if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        if running:
            killed = running[0]
            os.kill(int(killed.user_attrs["worker"].split(":")[1]), 9)
        time.sleep(0.05)
    assert killed is not None, "no trial was seen running"
    for process in started:
        process.wait(timeout=600)
    outputs = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        outputs.append((out.read(), err.read()))
    for process, (out, err) in zip(started, outputs):
        assert process.returncode == 0, err
        assert "Traceback" not in err and "OperationalError" not in err and "IntegrityError" not in err, err

    study_trials = trials(storage)
    finished = [t for t in study_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == N_TRIALS, [t.state for t in study_trials]
    # the killed worker's trials (its population trained them together) failed, each retried once and finished;
    # a trial it had asked for but not yet named itself the owner of (killed in between) failed as an orphan
    failed = [t for t in study_trials if t.state == TrialState.FAIL]
    assert killed.number in {t.number for t in failed}
    assert {t.user_attrs.get("worker") for t in failed} <= {killed.user_attrs["worker"], None}
    assert all(t.user_attrs["fail_reason"] == "its process stopped before it started" for t in failed
               if "worker" not in t.user_attrs)
    for trial in failed:
        retry, = [t for t in study_trials if t.system_attrs.get("failed_trial") == trial.number]
        assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)

    client = MlflowClient(services["MLFLOW_TRACKING_URI"])
    os.environ.update({key: services[key] for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "tags.`pipeline.role` = 'study'")
    assert len(parents) == 1
    for trial in finished:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(trial.intermediate_values)
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # every run the killed worker had opened was closed as an orphan (a trial of its population asked just
    # before the kill may have no run at all)
    orphans = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 f"tags.`optuna.study` = '{parents[0].data.tags['optuna.study']}' and "
                                 "tags.`pipeline.role` = 'trial'")
    opened = [run for run in orphans if int(run.data.tags["optuna.trial"]) in {t.number for t in failed}]
    assert killed.user_attrs["mlflow_run_id"] in {run.info.run_id for run in opened}
    for orphan in opened:
        assert orphan.info.status == "KILLED" and orphan.data.tags["pipeline.end_reason"]

    # the final model, registered from one machine, is served to another; no password in any output
    first, second = machines[0], machines[1]
    run_cli("train", "--final", "--tuned", "reports/tune/best_params.json", "--set", "train.epochs=2",
            "--set", "tracking.log_models=true",
            cwd=first[0], env=first[1], check=True)
    image = tmp_path / "digit.png"
    write_png(image)
    shown = run_cli("predict", str(image), "--model", "models:/digits-mlp@best", cwd=second[0], env=second[1],
                    check=True)
    assert "top-3:" in shown.stdout
    secrets = [services["MLFLOW_TRACKING_PASSWORD"], Path(services["PGPASSFILE"]).read_text().split(":")[-1].strip()]
    for out, err in outputs:
        assert not any(secret in out + err for secret in secrets)

    wrong = run_cli("train", "--model", "logreg", cwd=second[0],
                    env={**second[1], "MLFLOW_TRACKING_PASSWORD": "wrong"})
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and len(lines) == 1 and "refused the credentials (HTTP 401)" in lines[0], wrong.stderr

    # credentials in the URI itself (user:password@host, which MLflow's client takes as basic auth) are used by the
    # pipeline's own check of the server too; it said "does not answer (Name or service not known)"
    from urllib.parse import quote, urlsplit, urlunsplit

    server = urlsplit(second[1]["MLFLOW_TRACKING_URI"])
    for password, code in ((services["MLFLOW_TRACKING_PASSWORD"], 0), ("wrong", 2)):
        netloc = f"{services['MLFLOW_TRACKING_USERNAME']}:{quote(password, safe='')}@{server.netloc}"
        env = {**second[1], "MLFLOW_TRACKING_URI": urlunsplit(server._replace(netloc=netloc)),
               "MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}
        inline = run_cli("train", "--model", "logreg", "--set", "train.epochs=1", cwd=second[0], env=env)
        assert inline.returncode == code, inline.stderr
        assert not any(secret in inline.stdout + inline.stderr for secret in secrets)
        assert code == 0 or "refused the credentials (HTTP 401)" in inline.stderr, inline.stderr


def write_png(path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    Image.fromarray((load_digits().images[3] * 255 / 16).astype("uint8"), "L").save(path)


def test_a_search_through_optunas_grpc_proxy_finishes_exactly_n_trials(services, tmp_path, prepared_template):
    """Optuna's gRPC storage proxy in front of the same PostgreSQL, as for hundreds of workers: two workers through
    it, the study lock in PostgreSQL (tune.lock), this pipeline's heartbeats in place of the proxy's missing ones."""
    database = services["OPTUNA_STORAGE"]
    os.environ["PGPASSFILE"] = services["PGPASSFILE"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = ("import sys, optuna; optuna.storages.run_grpc_proxy_server(optuna.storages.RDBStorage(sys.argv[1]), "
             "host='127.0.0.1', port=int(sys.argv[2]))")
    proxy = subprocess.Popen([sys.executable, "-c", serve, database, str(port)], env=os.environ)
    try:
        repo, env = machine(tmp_path, "behind-a-proxy", services, f"grpc://127.0.0.1:{port}")
        shutil.copytree(prepared_template, repo / "data" / "prepared")
        # another study than the three machines' (tune.epochs), and no MLflow: this is about the storage
        edit_params(repo, {"tune.lock": database, "tune.epochs": 3, "tune.n_trials": 6, "tracking.enabled": False})
        result = run_cli("tune", "--workers", "2", cwd=repo, env=env)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    name = re.search(r"\[tune\] study (\S+) on grpc://", result.stdout).group(1)
    study = optuna.load_study(study_name=name, storage=database)  # read directly, behind the proxy's back
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6 and len(study.trials) == 6
    assert all("pipeline:heartbeat" in t.system_attrs for t in study.trials)  # beats went through the proxy
