"""Interrupted runs: what MLflow shows, and what resumes (only a run's own resume point: same config, data, code)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from torch.utils.tensorboard import SummaryWriter

from helpers import edit_params, run_cli, write_digit_folder

pytestmark = pytest.mark.slow
EVERY_EPOCH = {"PIPELINE_LOG_SECONDS": "0"}  # an epoch's line on stdout: the tests below wait for one


def train_until(repo, text, *overrides):
    """Start `train --model cnn`, SIGTERM it once `text` appears on stdout; returns its stderr."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--model", "cnn", *overrides], cwd=repo,
                               env={**os.environ, **EVERY_EPOCH}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        if text in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    return stderr


def test_changed_folder_data_is_never_resumed_from_the_old_resume_point(repo_copy, tmp_path):
    images = tmp_path / "images"
    write_digit_folder(images, per_class=12)
    edit_params(repo_copy, {"data.name": "folder", "data.path": str(images), "data.channels": 1,
                            "data.image_size": 8, "tracking.enabled": False, "train.epochs": 300, "replicates": 1})
    run_cli("prepare", cwd=repo_copy, check=True)
    first = tmp_path / "first-prepared"  # what `dvc checkout data/prepared` would bring back
    shutil.copytree(repo_copy / "data/prepared", first)
    train_until(repo_copy, "epoch   2/300")
    assert len(list((repo_copy / "checkpoints/cnn").glob("*.pt"))) == 1

    # the same images under other labels (digit_0 <-> digit_1), prepared again: other data, same config
    (images / "digit_0").rename(images / "swap")
    (images / "digit_1").rename(images / "digit_0")
    (images / "swap").rename(images / "digit_1")
    run_cli("prepare", cwd=repo_copy, check=True)
    stderr = train_until(repo_copy, "epoch   1/300")
    assert "resuming" not in stderr and "starting fresh: 1 resume point(s)" in stderr
    assert len(list((repo_copy / "checkpoints/cnn").glob("*.pt"))) == 2  # the old one is kept for its own data

    # and the first data's run still resumes where it stopped
    shutil.rmtree(repo_copy / "data/prepared")
    shutil.copytree(first, repo_copy / "data/prepared")
    stderr = train_until(repo_copy, "epoch   4/300")
    assert "after epoch 2" in stderr or "after epoch 3" in stderr


def code_version(repo):
    return subprocess.run([sys.executable, "-c", "from pipeline import training; print(training.code_version())"],
                          cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_other_training_code_has_another_resume_key(repo_copy):
    before = code_version(repo_copy)
    loop = repo_copy / "pipeline" / "loop.py"
    loop.write_text(loop.read_text() + "\n# an edit\n")
    assert code_version(repo_copy) != before


def test_ui_stops_with_one_line_naming_the_server_that_could_not_start(repo_copy, tmp_path):
    """TensorBoard's port is taken: ui names it in one line (exit 2) and leaves no MLflow UI running (each server
    fails alike: the first to exit is named)."""
    import socket

    import psutil

    mlflow_port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = subprocess.run([sys.executable, "-m", "pipeline", "ui", "--mlflow-port", str(mlflow_port),
                                  "--optuna-port", str(free_port()), "--tensorboard-port", str(taken.getsockname()[1]),
                                  "--set", f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}"],
                                 cwd=repo_copy, env=env, capture_output=True, text=True, timeout=120)
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, process.stderr
    assert lines[0].startswith("error: TensorBoard exited with code ") and "its log: " in lines[0]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if f"--port {mlflow_port}" in " ".join(p.info["cmdline"] or [])], "the MLflow UI was left running"


def test_ui_serves_both_links_to_the_models_and_ctrl_c_stops_everything_it_started(repo_copy, tmp_path):
    """ui creates a missing study storage, serves both (the printed MLflow link lists the project's models, as a
    browser shows it), and stops as a terminal's Ctrl-C asks: SIGINT to the foreground process group (here, the
    one `ui` leads). MLflow's server had left its worker processes running, and `make ui` ended in an error."""
    import urllib.request

    import psutil

    from helpers import browser

    storage = tmp_path / "missing" / "optuna.db"
    storage.parent.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # a model's run with a test metric, and one of its seed replicates: the link ui prints lists the models
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("digits", tags={"mlflow.experimentKind": "custom_model_development"})
    model = client.create_run(experiment, run_name="cnn-model-run", tags={"pipeline.level": "model"})
    client.log_metric(model.info.run_id, "test_accuracy", 0.987)
    client.create_run(experiment, run_name="cnn-seed-run", tags={"pipeline.level": "replicate"})
    with SummaryWriter(str(repo_copy / "runs" / "cnn" / "abc-seed42")) as writer:  # a run's TensorBoard folder
        writer.add_scalar("val_loss", 0.5, 1)
    mlflow_port, optuna_port, tensorboard_port = free_port(), free_port(), free_port()
    # SIGINT as a terminal's foreground job has it: a suite started in the background (a non-interactive shell's
    # `&`) runs with SIGINT ignored, and a child inherits that across exec unless it is handled here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--mlflow-port", str(mlflow_port),
                                    "--optuna-port", str(optuna_port), "--tensorboard-port", str(tensorboard_port),
                                    "--set", f"tune.storage=sqlite:///{storage}"],
                                   cwd=repo_copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        shown = [process.stdout.readline() for _ in range(3)]
        assert sorted(line.split(":")[0] for line in shown) == ["MLflow UI", "Optuna dashboard", "TensorBoard"], shown
        for port, path in ((optuna_port, "/api/studies"), (mlflow_port, "/")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{tensorboard_port}/data/runs", timeout=30) as response:
            assert json.loads(response.read()) == ["cnn/abc-seed42"]  # the repo's runs/ folder
        link, = [line.split("this project's runs: ")[1].rstrip(")\n") for line in shown if "project's runs" in line]
        # what a browser shows there (MLflow's UI is a JavaScript app: only a browser runs it)
        page = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,900",
                               "--virtual-time-budget=30000", "--dump-dom", link],
                              capture_output=True, text=True, timeout=120).stdout
        assert "cnn-model-run" in page and "cnn-seed-run" not in page
        assert 'col-id="metrics.`test_accuracy`"' in page and ">0.987<" in page  # a column, with the run's value
        started = psutil.Process(process.pid).children(recursive=True)
        assert len(started) >= 2
        os.killpg(process.pid, signal.SIGINT)
        try:  # its pipes read as it ends: a full one would block it
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            alive = [f"{each.pid} {each.status()} {' '.join(each.cmdline())}" for each in
                     [psutil.Process(process.pid), *started] if each.is_running()]
            raise AssertionError(f"ui still running 30 s after Ctrl-C: {alive}") from None
        assert process.returncode == 0, err
        assert "error" not in err.lower() and "Traceback" not in err, err
        assert "GET /" not in out + err  # access logs stay out of the terminal
        left = [each for each in started if each.is_running() and each.status() != psutil.STATUS_ZOMBIE]
        assert not left, [" ".join(each.cmdline()) for each in left]
    finally:
        if process.poll() is None:  # the servers too: each runs in a session of its own
            for each in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    each.kill()
            os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_diverging_run_is_failed_with_one_line(prepared_repo, tracked_env):
    repo_copy = prepared_repo
    result = run_cli("train", "--model", "mlp", "--set", "train.optimizer=sgd", "--set", "train.lr=1e12",
                     "--set", "train.epochs=3", cwd=repo_copy, env=tracked_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: training loss became")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 4  # the model's run and its three seed replicates'
    for run in runs:
        assert run.info.status == "FAILED" and "training loss became" in run.data.tags["error"]


def start_training(repo: Path, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--model", "cnn", *overrides], cwd=repo,
                            env={**os.environ, **env, **EVERY_EPOCH}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s"
    raise AssertionError(f"process ended before {text!r}: {process.stderr.read()}")


def only_run(client, level="model"):
    run, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`pipeline.role` = 'cnn' and tags.`pipeline.level` = '{level}'")
    return run


def replicate_runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.level` = 'replicate'", order_by=["params.seed ASC"])


def test_sigterm_ends_run_killed_and_the_resumed_training_continues_it(prepared_repo, tracked_env):
    repo_copy = prepared_repo
    process = start_training(repo_copy, tracked_env, "--set", "train.epochs=300", "--set", "replicates=1")
    wait_for_line(process, "epoch   2/300")  # every callback of epoch 1 ran, and its resume point exists
    assert list((repo_copy / "checkpoints/cnn").glob("*.pt")), "no resume point written"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated" in stderr
    client = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    killed = only_run(client)
    assert killed.info.status == "KILLED"
    assert len(client.get_metric_history(killed.info.run_id, "val_accuracy")) >= 1

    # another config under the same run name starts fresh and leaves the interrupted run's resume point alone
    other = run_cli("train", "--model", "cnn", "--set", "train.epochs=2", "--set", "replicates=1",
                    "--set", "tracking.log_models=false", cwd=repo_copy, env=tracked_env)
    assert other.returncode == 0 and "resuming" not in other.stderr and "starting fresh: 1 resume point" in other.stderr
    assert len(list((repo_copy / "checkpoints/cnn").glob("*.pt"))) == 1


def test_a_sigkilled_run_is_closed_by_the_next_process_and_its_resumed_training_logs_every_epoch_once(
        prepared_repo, tracked_env):
    repo_copy = prepared_repo
    # epochs reach MLflow only at the end: a SIGKILL loses them all, and the resumed run must send them
    settings = ("--set", "train.epochs=30", "--set", "tracking.flush_every_s=3600", "--set", "tracking.log_models=false")
    process = start_training(repo_copy, tracked_env, *settings)
    wait_for_line(process, "epoch   3/30")
    process.kill()
    process.wait(timeout=30)
    client = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    orphans = [only_run(client), *replicate_runs(client)]  # the model's run and its three seed replicates'
    assert len(orphans) == 4 and {run.info.status for run in orphans} == {"RUNNING"}

    run_cli("train", "--model", "logreg", "--set", "train.epochs=1", cwd=repo_copy, env=tracked_env, check=True)
    for orphan in orphans:
        closed = client.get_run(orphan.info.run_id)
        assert closed.info.status == "KILLED" and "killed" in closed.data.tags["pipeline.end_reason"]

    resumed = run_cli("train", "--model", "cnn", *settings, cwd=repo_copy, env=tracked_env, check=True)
    assert resumed.stderr.count("resuming from") == 3 and "starting fresh" not in resumed.stderr
    run = only_run(client)
    replicates = [each for each in replicate_runs(client) if each.data.tags["pipeline.role"] == "cnn"]
    assert [each.info.run_id for each in [run, *replicates]] == [each.info.run_id for each in orphans]
    for each in [run, *replicates]:
        assert each.info.status == "FINISHED" and "pipeline.end_reason" not in each.data.tags
    assert {each.data.tags["mlflow.parentRunId"] for each in replicates} == {run.info.run_id}
    for each in replicates:
        steps = [m.step for m in client.get_metric_history(each.info.run_id, "val_loss")]
        assert steps == list(range(1, 31))  # every epoch, each once
    assert not list((repo_copy / "checkpoints/cnn").glob("*.pt")), "a finished run keeps no resume point"
