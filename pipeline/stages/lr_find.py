"""`lr_find`: the learning-rate range test of the model the search tunes -> reports/lr_find/<model>/."""

from __future__ import annotations

from pipeline import paths
from pipeline.config import Config


def lr_find(cfg: Config) -> None:
    """The learning-rate range test for model.name, with its optimizer, batch size and data (lr_find.*): the curve,
    its plot and the suggestion -> reports/lr_find/<model>/, and the same as an MLflow run."""
    from pipeline import data, devices, files, loop, lr_finder, reporting, training

    prepared = data.load_prepared(paths.PREPARED_DIR)
    device = devices.resolve_device(cfg.train.device)
    devices.set_threads(cfg.train.threads, 1)
    model, train_batches, _ = training.setup(cfg, prepared, device)
    sweep = cfg.lr_find
    test = lr_finder.range_test(loop.Run(model, cfg.train, train_batches, []), device, sweep.min_lr, sweep.max_lr,
                                sweep.steps)
    reading = test.summary()
    low, high = reading["usable"]
    out, name = paths.lr_find_dir(cfg.model.name), cfg.model.name
    files.write_csv(out / paths.LR_CURVE, ["lr", "loss"], zip(test.lrs, test.losses))
    reporting.plot_lr_range(*test.window(), reading["steepest"], reading["usable"], out / paths.LR_PLOT,
                            f"{name}, {cfg.train.optimizer}, batch {cfg.train.batch_size}: range test")
    files.write_json(out / paths.LR_SUGGESTION, {
        "model": name, "optimizer": cfg.train.optimizer, "batch_size": cfg.train.batch_size,
        "min_lr": sweep.min_lr, "max_lr": sweep.max_lr, **reading, "data.md5": prepared.md5})
    if cfg.tracking.enabled:
        from pipeline import tracking

        tracking.log_lr_find(cfg, f"lr_find-{name}", prepared.md5, test.lrs, test.losses, reading, out)
    how = "until the loss diverged" if test.stopped_early else f"up to {sweep.max_lr:g}"
    print(f"[lr-find] {name}: the loss falls fastest at lr {reading['steepest']:.2e}; usable {low:.2e} .. {high:.2e} "
          f"({len(test.lrs)} steps from {sweep.min_lr:g} {how}) -> {out}/\n"
          f"  to search a decade either side of it: dvc exp run -S tune.lr_from_finder=true")
