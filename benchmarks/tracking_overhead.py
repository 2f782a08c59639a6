"""What MLflow tracking costs a training run, measured (not asserted).

Trains the same model twice in one process, with and without the MLflow
callback, against a fresh SQLite store in a temp dir, and prints the loop's
wall time, the time spent in metric logging, and the fixed per-run costs
(opening the store and run, logging params/config, logging the model).

    python benchmarks/tracking_overhead.py [--model cnn] [--epochs 30] [--flush-every-s 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipeline import data, loop, models, tracking
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--flush-every-s", type=float, default=5.0)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    store = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    cfg = load_config(args.params, [f"model.name={args.model}", f"train.epochs={args.epochs}",
                                    f"tracking.flush_every_s={args.flush_every_s}", "train.resume=false"])
    prepared = data.load_prepared(Path("data/prepared"))
    device = loop.resolve_device(cfg.train.device)

    def fit(callbacks):
        loop.seed_everything(cfg.seed, cfg.train.deterministic)
        model = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
        batches = data.training_batches(prepared, cfg.train.batch_size, cfg.data.augment, cfg.seed, device)
        tick = time.perf_counter()
        result = loop.fit(model, *batches, cfg.train, device, callbacks)
        return time.perf_counter() - tick, model, result

    fit([])  # warm-up: first-epoch allocations and lazy imports
    plain, _, _ = fit([])

    tick = time.perf_counter()
    tracking.connect(cfg.tracking)  # first use creates the schema, as in a fresh clone
    run = tracking.TrackedRun(cfg, "bench", tracking.lineage_tags(cfg, prepared.md5, "bench"))
    run.__enter__()
    run.log_config()
    opening = time.perf_counter() - tick
    tracked, model, result = fit([run.metrics])
    tick = time.perf_counter()
    model.load_state_dict(result.best_state)
    classifier = models.Classifier(model.cpu(), prepared.mean, prepared.std, prepared.classes, prepared.input_shape)
    run.log_model(classifier.eval(), prepared.val.images[:2].float().div(255).numpy(), None)
    run.__exit__(None, None, None)
    closing = time.perf_counter() - tick

    logging = run.metrics.seconds_spent
    print(f"model {args.model}, {args.epochs} epochs on {device}, flush every {args.flush_every_s}s")
    print(f"loop without tracking      {plain:8.3f} s")
    print(f"loop with tracking         {tracked:8.3f} s   ({(tracked / plain - 1) * 100:+.1f}% wall)")
    print(f"  of which metric logging  {logging:8.3f} s   ({logging / tracked * 100:.2f}% of the loop)")
    print(f"open store + run + params  {opening:8.3f} s   (once per run)")
    print(f"log model + end run        {closing:8.3f} s   (once per run)")
    total = tracked + opening + closing
    print(f"all tracking / whole run   {(logging + opening + closing) / total * 100:8.2f} %")


if __name__ == "__main__":
    main()
