"""Commands for people, beside the DVC stages: predict, reproduce, compare, ui."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import paths
from pipeline.config import Config, flatten
from pipeline.errors import CheckFailed, UserError, first_line
from pipeline.paths import FINAL, RunPaths


def predict(cfg: Config, images: list[str], model_uri: str | None) -> None:
    """Top-3 classes for image files, from the final local model or an MLflow model URI.

    A model from MLflow is downloaded and its weights loaded with this repo's code
    (`torch.load(weights_only=True)`): nothing from the store is unpickled or run.
    """
    import torch

    from pipeline import models
    from pipeline.datasets import folders

    with tempfile.TemporaryDirectory(prefix="predict-") as scratch:
        if model_uri:
            from pipeline import tracking

            model_file = tracking.download_model_file(cfg, model_uri, Path(scratch))
        else:
            model_file = RunPaths.of(FINAL).model
        classifier = models.load_classifier(model_file)
    channels, height, _ = classifier.input_shape
    pixels = torch.stack([folders.load_image(Path(path), channels, height) for path in images]).float().div(255)
    with torch.inference_mode():
        probs = classifier(pixels)
    top = probs.topk(min(3, probs.shape[1]), dim=1)
    for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist()):
        ranked = ", ".join(f"{classifier.classes[i]} {p:.3f}" for p, i in zip(values, indices))
        print(f"{path}: {classifier.classes[indices[0]]}  (top-3: {ranked})")


def reproduce(cfg: Config, run_id: str, within_seeds: bool = False) -> None:
    """Retrain an MLflow run from its logged config on the same data and compare its test metrics: exactly where
    that is promised (CPU, or CUDA with deterministic kernels), else (or with `within_seeds`) against the spread
    its model's seed replicates measured: each metric within mean ± 2 std over the seeds."""
    from pipeline import data, devices, evaluation, tracking
    from pipeline.config import parse_yaml, validate
    from pipeline.stages.evaluate import predict_test_set
    from pipeline.stages.train import train

    logged, tags, logged_metrics = tracking.fetch_run(cfg, run_id)
    original = validate(parse_yaml(logged, f"run {run_id} config.yaml"), source=f"run {run_id} config.yaml")
    prepared = data.load_prepared(paths.PREPARED_DIR)
    if original.data.name != cfg.data.name or prepared.md5 != tags.get("data.md5"):
        commit = tags.get("mlflow.source.git.commit", "<the run's commit>")
        raise UserError(f"{paths.PREPARED_DIR} (md5 {prepared.md5}, {cfg.data.name}) is not the data run {run_id} "
                        f"trained on (md5 {tags.get('data.md5')}, {original.data.name}): run `git checkout {commit} "
                        f"&& dvc checkout {paths.PREPARED_DIR}` (or `dvc repro prepare` there) first")
    device = devices.resolve_device(original.train.device)
    exact = not within_seeds and (device.type != "cuda" or original.train.deterministic)
    # the seeds' spread: the model's run measured it (a replicate's run reads its model's)
    replicate = tags.get("pipeline.level") == "replicate"
    spread = tracking.fetch_run(cfg, tags["mlflow.parentRunId"])[2] if replicate and not exact else logged_metrics
    if not exact and not any(key.endswith("_std") for key in spread):
        raise UserError(f"run {run_id} has no seed spread to reproduce within (it trained with replicates 1, or "
                        "before `evaluate` logged one): only an exact check is possible, on a CPU")

    # a seed replicate trained in its model's population: retrain that population (from its first seed), and
    # compare this replicate
    index = int(tags.get("replicate.index", 0))
    retrain = original.with_overrides({"seed": original.seed - index, "tracking.enabled": False,
                                       "train.resume": False})
    role = tags.get("pipeline.role", original.model.name)
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:  # never touches models/ or reports/
        run_paths = RunPaths.of(role, Path(scratch))
        train(retrain, role, run_paths)
        model_file = run_paths.replicate_model(original.seed) if "replicate.index" in tags else run_paths.model
        y_true, probabilities, _ = predict_test_set(model_file, prepared, device)
    new = {f"test_{k}": v for k, v in evaluation.classification_metrics(y_true, probabilities.argmax(1)).items()}
    old = {key: logged_metrics.get(key) for key in new}

    def bounds(key: str) -> tuple[float | None, float | None]:
        if exact or f"{key}_std" not in spread:
            return old[key], old[key]
        mean, std = spread[f"{key}_mean"], spread[f"{key}_std"]
        return mean - 2 * std, mean + 2 * std

    band_header = "" if exact else f"{'seeds: mean ± 2 std':>26}"
    print(f"\n{'metric':<26}{'run ' + run_id[:8]:>14}{'reproduced':>14}{band_header}")
    differing = []
    for key in new:
        low, high = bounds(key)
        inside = old[key] is not None and low is not None and low <= new[key] <= high
        if not inside:
            differing.append(key)
        shown = "missing" if old[key] is None else f"{old[key]:.6f}"
        band = "" if exact else f"{f'[{low:.4f}, {high:.4f}]':>26}"
        mark = "" if inside else "   <- " + ("differs" if exact else "outside")
        print(f"{key:<26}{shown:>14}{new[key]:>14.6f}{band}{mark}")
    one = len(differing) == 1
    how = ("differs" if one else "differ") if exact else f"fall{'s' * one} outside the seeds' spread"
    if differing:
        raise CheckFailed(f"run {run_id} not reproduced: {', '.join(differing)} {how}")
    why = "" if within_seeds else " (exactness is not promised on CUDA without deterministic kernels)"
    print(f"run {run_id} reproduced " + ("exactly" if exact else f"within its seeds' spread{why}"))


def compare(cfg: Config, sources: list[str], markdown: Path | None = None) -> None:
    """Every pair of `sources` judged on the same test images, as compare.md judges the models of one repro.

    A source is an MLflow run id (a model's or one seed replicate's), a registered model (models:/NAME@ALIAS),
    or a git revision or DVC experiment name, optionally with `:RUN` (default: final), whose
    reports/eval/RUN/predictions.npz is read from the DVC cache (a path to such a file works too).
    """
    from pipeline import comparison, files, reporting

    if len(sources) < 2:
        raise UserError("compare needs at least two results (run ids, models:/NAME@ALIAS, git revisions or DVC "
                        "experiment names)")
    with tempfile.TemporaryDirectory(prefix="compare-") as scratch:
        compared = [_predictions_of(cfg, source, Path(scratch) / str(i)) for i, source in enumerate(sources)]
    names = [each.name for each in compared]
    compared = [each if names.count(each.name) == 1 else dataclasses.replace(each, name=f"{each.name} [{i + 1}]")
                for i, each in enumerate(compared)]
    pairs = comparison.compare(compared, cfg.seed)
    text = comparison.best_line(compared, pairs) + "\n\n" + reporting.markdown_table(
        comparison.TABLE_HEADER, comparison.table_rows(pairs))
    print(text, end="")
    if markdown:
        files.write_text(markdown, f"# {' vs '.join(each.name for each in compared)}\n\n{text}")


# short headers: what they leave over is the changed params' room
EXPERIMENTS_HEADER = ["experiment", "changed params", "final accuracy [95% CI]", "Δ vs HEAD [95% CI]", "verdict"]


def experiments(cfg: Config, markdown: Path | None = None, width: int = 120) -> None:
    """One row per DVC experiment of HEAD (read through dvc.api, as `dvc exp show` reads them), in `width` columns:
    the params it changed from its baseline, the final model's test accuracy with its interval, and the difference
    from the baseline on the same test images with its verdict (paired, Holm-corrected over the experiments)."""
    import dvc.api
    from dvc.exceptions import DvcException

    from pipeline import comparison, files, reporting

    try:
        rows = dvc.api.exp_show()
    except DvcException as err:
        raise UserError(f"cannot read DVC's experiments: {first_line(err)}") from None
    baseline = next((row for row in rows if row.get("typ") == "baseline" and row["rev"] != "workspace"), None)
    named = [row for row in rows if row.get("Experiment") and row is not baseline]
    if baseline is None or not named:
        raise UserError("no DVC experiments of HEAD to show: run one, e.g. `dvc exp run -S train.epochs=5` "
                        "(`dvc exp run --queue` and `--temp` leave the workspace alone)")
    base_rev = baseline["rev"]
    base_params = flatten(dvc.api.params_show(rev=base_rev))
    table = [["baseline", f"HEAD ({base_rev})", *_accuracy(base_rev), "", ""]]
    done, unfinished = [], []
    with tempfile.TemporaryDirectory(prefix="experiments-") as scratch:
        base = _predictions_of(cfg, f"{base_rev}:{FINAL}", Path(scratch) / "baseline")
        for index, row in enumerate(named):
            name, state = row["Experiment"], (row.get("State") or "").lower()
            if state not in ("", "success"):  # queued, running or failed: no outputs to judge yet
                unfinished.append([name, "", "", "", state])
                continue
            params = flatten(dvc.api.params_show(rev=name))
            changed = ", ".join(f"{key}={_shown_value(value)}" for key, value in params.items()
                                if base_params.get(key, _MISSING) != value) or "(none)"
            predictions = _predictions_of(cfg, f"{name}:{FINAL}", Path(scratch) / str(index))
            done.append((name, changed, dataclasses.replace(predictions, name=name)))
        pairs = comparison.compare([dataclasses.replace(base, name="baseline"), *(p for _, _, p in done)], cfg.seed,
                                   baseline="baseline")
    for (name, changed, _), pair in zip(done, pairs):
        sign = 1 if pair.better == name else -1
        low, high = sorted(sign * bound for bound in pair.interval["accuracy"])
        verdict = ("better" if sign > 0 else "worse") if pair.significant else \
            "identical predictions" if (low, high) == (0.0, 0.0) else f"no sig. diff (±{pair.resolvable:.3f})"
        table.append([name, changed, *_accuracy(name),
                      f"{sign * pair.difference['accuracy']:+.4f} [{low:+.3f}, {high:+.3f}]", verdict])
    table += unfinished
    print(reporting.text_table(EXPERIMENTS_HEADER, table, width, squeeze=1))
    count = f"{len(done)} experiment{'s' * (len(done) != 1)}"
    print(f"Δ: the final model's mean test accuracy over seeds minus the baseline's, on the same test images\n"
          f"(images and seeds resampled); a verdict needs McNemar's test (Holm over {count}) and the interval.")
    if markdown:
        files.write_text(markdown, "# Experiments against HEAD\n\n"
                         + reporting.markdown_table(EXPERIMENTS_HEADER, table))


_MISSING = object()


def _shown_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _accuracy(rev: str) -> list[str]:
    """The final model's test accuracy with its interval at `rev`, as reports/metrics.json holds it."""
    import dvc.api

    metrics = dvc.api.metrics_show(str(paths.METRICS_JSON), rev=rev)
    try:
        return [f"{metrics['accuracy']:.4f} [{metrics['accuracy_ci95_low']:.3f}, "
                f"{metrics['accuracy_ci95_high']:.3f}]"]
    except KeyError:
        return ["?"]


def _predictions_of(cfg: Config, source: str, scratch: Path):
    from pipeline.comparison import Predictions

    scratch.mkdir(parents=True)
    if Path(source).suffix == ".npz" and Path(source).is_file():
        return Predictions.load(Path(source), Path(source).stem)
    if source.startswith("models:/") or _is_run_id(source):
        from pipeline import tracking

        local, name, index = tracking.logged_predictions(cfg, source, scratch)
        loaded = Predictions.load(local, name)
        return loaded if index is None else loaded.only(index, name)
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    rev, _, run = source.partition(":")
    path = paths.eval_dir(run or FINAL) / paths.PREDICTIONS
    try:
        with dvc.api.open(str(path), rev=rev or None, mode="rb") as stream:
            (scratch / paths.PREDICTIONS).write_bytes(stream.read())
    except (DvcException, SCMError, OSError) as err:
        raise UserError(f"cannot read {path} at {rev!r}: {first_line(err)} (a git revision or DVC experiment "
                        "name whose outputs are in this repo's DVC cache; `dvc exp list` names them)") from None
    return Predictions.load(scratch / paths.PREDICTIONS, f"{rev}:{run or FINAL}")


def _is_run_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


# DVC's page loads Vega from a CDN: a page of our own carries it inline. DVC's templates are Vega-Lite 5 specs.
VEGA_LITE = "5.20"
# the page's second line: a page written by another version is written again
_PLOTS_STAMP = "<!-- DVC's plots page, Vega, Vega-Lite {vega_lite} and Vega-Embed inline (vl-convert {vl_convert}) -->"
_PLOTS_PAGE = """<!DOCTYPE html>
{stamp}
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<script>{bundle}</script>
<style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def offline_plots_template() -> Path:
    """The plots page that renders without a network, at paths.PLOTS_TEMPLATE, written once per Vega-Lite and
    vl-convert version; and named as DVC's `plots.html_template` in .dvc/config.local unless a config already names
    a template, so that plain `dvc plots show` and `dvc plots diff` render offline too."""
    import vl_convert
    from dvc.repo import Repo

    from pipeline import files

    stamp = _PLOTS_STAMP.format(vega_lite=VEGA_LITE, vl_convert=vl_convert.__version__)
    template = paths.PLOTS_TEMPLATE
    if not template.is_file() or template.read_text().splitlines()[1:2] != [stamp]:
        files.write_text(template, _PLOTS_PAGE.format(stamp=stamp, bundle=vl_convert.javascript_bundle(
            vl_version=VEGA_LITE)))
    with Repo() as repo:  # DVC resolves a relative html_template against .dvc/
        if repo.config.get("plots", {}).get("html_template") is None:
            with repo.config.edit("local") as config:
                config["plots"]["html_template"] = str(template.relative_to(paths.DVC_DIR))
            print(f"dvc plots show renders offline: .dvc/config.local names {template} as its page")
    return template


def plots(out: Path, revisions: list[str]) -> None:
    """`dvc plots show` (or `dvc plots diff REV...`) into `out`/index.html, rendering without a network: its page
    carries Vega, Vega-Lite and Vega-Embed inline (vl-convert's bundle) instead of loading them from a CDN."""
    template = offline_plots_template()
    command = ["diff", *revisions] if revisions else ["show"]
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", *command, "--html-template", str(template.resolve()),
                           "-o", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"dvc plots {command[0]} failed: {first_line(done.stderr.strip() or done.stdout)}")
    print(f"{out / 'index.html'}: every plot, rendered offline (open it in a browser)")


def ui(cfg: Config, mlflow_port: int, optuna_port: int, tensorboard_port: int, verbose: bool = False,
       ready_timeout_s: float = 120) -> None:
    """Serve the MLflow UI, optuna-dashboard and (with tracking.tensorboard) TensorBoard on 127.0.0.1 against
    this repo's stores until Ctrl-C.

    Missing stores get their schema first (optuna-dashboard opens storage without creating tables). Each URL
    is printed once it answers; if a server exits, this says which and stops with an error. Server logs go
    to files (their path is shown) unless --verbose. Each server runs in a session of its own, so Ctrl-C reaches
    this process only: it stops them all, their worker processes included, and returns normally.
    """
    from pipeline import paths, tuning
    from pipeline.evaluation import BOUNDS
    from pipeline.tracking import ui as mlflow_ui

    mlflow_command = mlflow_ui.command(cfg, mlflow_port)
    # the models page's columns: test accuracy with its interval and its spread over seeds, and the macro F1
    shown = ["accuracy", *(f"accuracy_{bound}" for bound in BOUNDS), "accuracy_mean", "accuracy_std", "f1_macro"]
    storage = tuning.storage_url(cfg.tune)
    tuning.open_storage(cfg.tune)  # creates a missing schema
    here = str(Path(sys.executable).parent)
    dashboard = shutil.which("optuna-dashboard", path=here) or "optuna-dashboard"
    servers = {
        "MLflow UI": (mlflow_command, f"http://127.0.0.1:{mlflow_port}"),
        "Optuna dashboard": ([dashboard, storage, "--host", "127.0.0.1", "--port", str(optuna_port)],
                             f"http://127.0.0.1:{optuna_port}"),
    }
    if cfg.tracking.tensorboard:
        paths.tensorboard_dir().mkdir(exist_ok=True)
        servers["TensorBoard"] = ([shutil.which("tensorboard", path=here) or "tensorboard", "--logdir",
                                   str(paths.tensorboard_dir()), "--host", "127.0.0.1", "--port",
                                   str(tensorboard_port)], f"http://127.0.0.1:{tensorboard_port}")
    log_dir = Path(tempfile.mkdtemp(prefix="pipeline-ui-"))
    running: dict[str, subprocess.Popen] = {}
    try:
        for name, (command, _) in servers.items():
            log = None if verbose else open(log_dir / f"{name.split()[0].lower()}.log", "w")
            running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None,
                                             start_new_session=True, env={**os.environ, **mlflow_ui.SERVER_ENV})
        pending = dict(servers)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            for name, process in running.items():
                if process.poll() is not None:
                    where = "" if verbose else f"; its log: {log_dir / (name.split()[0].lower() + '.log')}"
                    how = f"was killed (signal {-process.returncode})" if process.returncode < 0 \
                        else f"exited with code {process.returncode}"
                    raise UserError(f"{name} {how}{where}")
            for name, (_, url) in list(pending.items()):
                if _answers(url):
                    page = mlflow_ui.runs_page(cfg, url, shown) if name == "MLflow UI" else None
                    print(f"{name + ':':<18} {url}" + (f"  (this project's runs: {page})" if page else ""), flush=True)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise UserError(f"{', '.join(pending)} did not answer within {ready_timeout_s:g}s")
            time.sleep(0.3)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a user stops the servers, not a failure
        print("stopped the servers", file=sys.stderr)
    finally:
        _stop_sessions(list(running.values()))


def _stop_sessions(processes: list[subprocess.Popen], grace_s: float = 10) -> None:
    """Stop each process and everything it started (its session's process group): SIGTERM, then SIGKILL for
    whatever is still there after `grace_s` (MLflow's server leaves worker processes behind its own exit)."""
    import signal

    def signal_groups(number: int) -> list[int]:
        alive = []
        for process in processes:
            try:
                os.killpg(process.pid, number)
                alive.append(process.pid)
            except ProcessLookupError:  # nothing of that session is left
                pass
        return alive

    signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for process in processes:
            process.poll()  # reaps a server that exited, so its group can empty
        if not signal_groups(0):
            return
        time.sleep(0.1)
    signal_groups(signal.SIGKILL)
    for process in processes:
        process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # e.g. 401 behind authentication: it answers
        return True
    except OSError:
        return False
