"""`train@<model>` and `train_final`: one model trained through the shared loop, once per seed replicate ->
models/<run>/, reports/train/<run>/ and its MLflow runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.paths import FINAL, RunPaths


def train(cfg: Config, run_name: str, run_paths: RunPaths | None = None) -> str | None:
    """Train `cfg.model.name` with the shared loop, once per seed replicate; write the models, the shipped one's
    history and the metrics.

    The `replicates` (seeds seed, seed+1, ...) train together as one population
    (`pipeline.population`); the best on validation ships as the model. Each is
    its own MLflow run, nested under the model's run. An interrupted run resumes
    from its own resume points (same config, data and code) and continues its
    own MLflow runs; a finished run is never resumed. Started by torchrun
    (`train --nproc N`), every rank trains (the replicates one after another)
    and rank 0 alone writes, logs and tracks. Returns the model's MLflow run id
    (None with tracking off).
    """
    from pipeline import data, devices, distributed, loop, training

    training.log_seconds()  # a bad PIPELINE_LOG_SECONDS fails before anything starts
    run_paths = run_paths or RunPaths.of(run_name)
    prepared = data.load_prepared(paths.PREPARED_DIR)
    world, device = distributed.init(devices.resolve_device(cfg.train.device))
    threads = devices.set_threads(cfg.train.threads, world.size)  # ranks on one machine share its cores
    try:
        several, family = cfg.replicates > 1, training.resume_key(cfg, prepared.md5)
        runs = []
        for member, key in zip(training.replicate_configs(cfg), training.resume_keys(cfg, prepared.md5)):
            model, train_batches, val_batches = training.setup(member, prepared, device, world)
            checkpoints = loop.Checkpoints(run_paths.checkpoints, key, writer=world.is_main, family=family)
            runs.append(loop.Run(model, member.train, train_batches, val_batches, checkpoints=checkpoints,
                                 key=member))
        if not world.is_main:  # the other ranks train their slices, and that is all
            for run in runs:
                loop.fit_run(run, device, world)
            return None
        from pipeline import models

        ranks = f" x {world.size} processes" if world.distributed else ""
        on = f"{device} ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else str(device)
        seeds = f", seeds {cfg.seed}-{cfg.seed + cfg.replicates - 1}" if several else ""
        print(f"[{run_name}] {cfg.model.name}: {models.count_parameters(runs[0].model):,} parameters on {on}{ranks}, "
              f"{len(prepared.train)} train / {len(prepared.val)} val images{seeds}", flush=True)
        name = cfg.model.name if run_name == cfg.model.name else f"{cfg.model.name}-{run_name}"
        with contextlib.ExitStack() as tracked:
            parent, own_runs = _track_replicates(cfg, run_name, name, runs, prepared, tracked)
            if several and not world.distributed:
                from pipeline import population

                population.fit_together(runs, device)
                if failed := next((run.error for run in runs if run.error is not None), None):
                    raise failed
            else:
                for run in runs:
                    loop.fit_run(run, device, world)
            results = [run.result for run in runs]
            ships = training.shipped(cfg, results)
            summary = _write_training_outputs(cfg, run_name, run_paths, runs, ships, prepared)
            if parent:
                _log_training(cfg, parent, own_runs, run_name, run_paths, summary, runs, ships, prepared, world)
        for run in runs:
            run.checkpoints.clear()  # the outputs exist: this run is finished and must not be resumed
    finally:
        distributed.shutdown(world)
    best = results[ships].best
    which = f" (seed {cfg.seed + ships}, the best of {cfg.replicates} on {cfg.train.monitor})" if several else ""
    print(f"[{run_name}] ships epoch {results[ships].best_epoch}: val_accuracy {best.val_accuracy:.4f} "
          f"val_loss {best.val_loss:.4f} -> {run_paths.model}{which}")
    return parent.run_id if parent else None


def _track_replicates(cfg, run_name, name, runs, prepared, tracked: contextlib.ExitStack):
    """The model's MLflow run (None with tracking off) and each replicate's: with several, one nested run each,
    else the model's own. A resumed run continues its own. Gives each run its callbacks (the console, its MLflow
    curves, its TensorBoard folder)."""
    import torch

    from pipeline import board, training

    data_md5, several = prepared.md5, len(runs) > 1
    images = prepared.train.take(torch.arange(min(32, len(prepared.train)))) \
        if cfg.tracking.tensorboard else None  # TensorBoard's look at the inputs
    resumed = [run.checkpoints.load() if cfg.train.resume else None for run in runs]
    continued = next((run.checkpoints.meta.get("mlflow_parent_run_id") for run, state in zip(runs, resumed)
                      if state), None)
    parent = tracked.enter_context(training.tracked_run(
        cfg, f"{name}-{cfg.fingerprint()}", run_name, data_md5, tags={"pipeline.level": "model"},
        continue_run_id=continued if several else (resumed[0] and runs[0].checkpoints.meta.get("mlflow_run_id"))))
    own_runs = []
    for index, (run, state) in enumerate(zip(runs, resumed)):
        member = run.key
        own = parent
        label = f"{name}-seed{member.seed}-{cfg.fingerprint()}" if several else f"{name}-{cfg.fingerprint()}"
        if parent and several:
            own = tracked.enter_context(training.tracked_run(
                member, label, run_name, data_md5,
                continue_run_id=state and run.checkpoints.meta.get("mlflow_run_id"), parent_run_id=parent.run_id,
                tags={"pipeline.level": "replicate", "replicate.index": str(index),
                      "replicate.seed": str(member.seed)}))
        if own:
            run.checkpoints.meta |= {"mlflow_run_id": own.run_id, "mlflow_parent_run_id": parent.run_id}
        shown = f"{run_name} seed {member.seed}" if several else run_name
        run.callbacks = [training.ConsoleLog(shown, cfg.train.epochs)] + ([own.metrics] if own else []) + (
            [board.TensorBoard(board.run_dir(cfg, label), member, images)] if cfg.tracking.tensorboard else [])
        own_runs.append(own)
    return parent, own_runs


def _write_training_outputs(cfg, run_name, run_paths, runs, ships, prepared) -> dict:
    """Every replicate's model file, the shipped one's copy as the model, its history.csv, metrics.json (with
    the replicates' spread) and curves.png (every replicate's); returns the summary."""
    from pipeline import files, metrics, models, reporting, training

    mean, std = models.input_stats(cfg.model, prepared.mean, prepared.std)
    several = len(runs) > 1
    for index, run in enumerate(runs):
        member = run.key
        info = {"replicate": {"seed": member.seed, "index": index, "of": len(runs), "ships": index == ships,
                              "chosen_on": cfg.train.monitor}} if several else {}
        models.save_model(run_paths.replicate_model(member.seed) if several else run_paths.model,
                          run.result.best_state, member, prepared.classes, prepared.input_shape, mean, std,
                          run_name=run_name, best_epoch=run.result.best_epoch, data_md5=prepared.md5, **info)
    if several:
        files.copy_file(run_paths.replicate_model(cfg.seed + ships), run_paths.model)
    summary = training.summary(cfg, [run.result for run in runs], ships, runs[ships].model)
    files.write_csv(run_paths.history, metrics.HISTORY_COLUMNS, map(metrics.history_row, runs[ships].result.history))
    files.write_json(run_paths.metrics, summary)
    reporting.plot_curves({f"seed {run.key.seed}" if several else run_name: run.result.history for run in runs},
                          run_paths.curves)
    return summary


def _log_training(cfg, parent, own_runs, run_name, run_paths, summary, runs, ships, prepared, world) -> None:
    """What MLflow gets beyond the per-epoch curves: the best epoch's values (and with several replicates their
    spread on the model's run and each replicate's own on its run), facts as tags, files, the shipped model."""
    import torch

    from pipeline import files, models

    shipped = runs[ships]
    best = shipped.result.best
    several = len(runs) > 1
    common = {"distributed.world_size": world.size, "torch.threads": torch.get_num_threads()}
    for index, (run, own) in enumerate(zip(runs, own_runs) if several else []):
        result = run.result
        own.log_metrics({"best_val_loss": result.best.val_loss, "best_val_accuracy": result.best.val_accuracy})
        own.set_tags({"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                      "stopped_early": result.stopped_early, "replicate.ships": index == ships,
                      "train_seconds": f"{result.seconds:.1f}", "tracking_seconds": f"{own.metrics.seconds_spent:.2f}",
                      **common, "model.md5": files.file_digest(run_paths.replicate_model(run.key.seed))})
        own.log_config()
    spread = {f"best_{key}": summary[key] for key in ("val_loss_mean", "val_loss_std", "val_accuracy_mean",
                                                      "val_accuracy_std")} if several else {}
    if several:  # the model's run shows the curves of the replicate it ships
        for metrics in shipped.result.history:
            parent.metrics.on_epoch_end(metrics)
        parent.metrics.flush()
    parent.log_metrics({"best_val_loss": best.val_loss, "best_val_accuracy": best.val_accuracy, **spread})
    weights_sha256 = getattr(shipped.model, "weights_sha256", None)
    parent.set_tags({"best_epoch": shipped.result.best_epoch, "epochs_run": summary["epochs_run"],
                     "stopped_early": shipped.result.stopped_early, "model.parameters": summary["parameters"],
                     "replicates": len(runs), "replicate.seeds": ",".join(str(run.key.seed) for run in runs),
                     "replicate.shipped_seed": shipped.key.seed,
                     "train_seconds": f"{max(run.result.seconds for run in runs):.1f}",
                     **({} if several else {"tracking_seconds": f"{parent.metrics.seconds_spent:.2f}"}), **common,
                     # which pretrained file training started from (model.weights names it; this is its content)
                     **({"model.weights_sha256": weights_sha256} if weights_sha256 else {})})
    parent.log_config()
    parent.log_artifacts(run_paths.history, run_paths.curves, run_paths.metrics)
    if cfg.tracking.log_models:
        classifier = models.load_classifier(run_paths.model)
        example = prepared.val.images[:2].float().div(255).numpy()
        with torch.inference_mode():
            probabilities = classifier(torch.from_numpy(example)).numpy()
        registered = f"{cfg.data.name}-{cfg.model.name}" if run_name == FINAL else None
        parent.log_model(run_paths.model, example, probabilities, registered,
                         selection={"val_loss": best.val_loss, "val_accuracy": best.val_accuracy})


def tuned(cfg: Config, best_params: Path) -> Config:
    """cfg with the winning values of a search (reports/tune/best_params.json) applied."""
    from pipeline import files

    record = files.read_json(best_params, "run `python -m pipeline tune` (or `dvc repro tune`) to write it")
    try:
        print(f"[final] trains with trial {record['trial']}'s params (study {record['study']}, {best_params})")
        return cfg.with_overrides(record["params"])
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{best_params} is not a search's best-params record; run `dvc repro -f tune` to "
                        "write it again") from None
