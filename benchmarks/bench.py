"""The shared loop and the whole pipeline, side by side with what users would use instead.

    python benchmarks/bench.py            # default sizes (MNIST/CIFAR-format data), ~10 minutes on 2 CPU cores
    python benchmarks/bench.py --quick    # small sizes, for CI: checks that every comparison runs
    python benchmarks/bench.py --only data,mlp

Every comparison runs A and B interleaved (A B A B ...) after a warm-up, in this process where possible, with
the same model, batch size, optimizer, samples and thread count, and reports median, min and max per side and
the ratio B/A of the medians (reference time / ours: above 1 means ours is faster; where each pair is a workload
of its own, such as a search with its own seed, the median of the pairs' ratios). Targets are printed beside
the ratio and judged on the spread of the pairs' ratios (met, MISSED, or unresolved when the target lies inside
it); a reference is never tuned down. Data is generated in the official formats (MNIST: 1x28x28 x 60,000, 10
classes; CIFAR: 3x32x32 x 50,000), so everything runs offline. A full run writes docs/bench/<device>.json and
docs/performance.md, one table per device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import batching, data, devices, loop, models, population, processes, training  # noqa: E402
from pipeline.config import load_config  # noqa: E402

RESULTS = REPO / "docs" / "bench"  # one JSON per device a full run measured: docs/performance.md is made from them
PAGE = REPO / "docs" / "performance.md"
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DEFAULTS = load_config(REPO / "params.yaml")  # what `dvc repro` runs with
DEFAULT_POPULATION = DEFAULTS.tune.population


@dataclass
class Row:
    name: str
    a: str  # ours
    b: str  # the reference
    unit: str  # what the numbers are (seconds per epoch, samples/s, ...)
    a_values: list[float]
    b_values: list[float]
    target: float | None = None  # minimum ratio reference/ours
    condition: bool | None = None  # a second requirement besides the ratio (e.g. a score within noise)
    higher_is_better: bool = False  # samples/s: ratio = ours / reference
    note: str = ""
    extra: dict = field(default_factory=dict)
    # a_values[i] and b_values[i] measure one workload of their own (e.g. a search with seed i, which trains other
    # trials than seed j): the ratio is the median of the pairs' ratios, never of two medians of other workloads
    paired: bool = False

    @property
    def ratio(self) -> float:
        if not (self.a_values and self.b_values):
            return float("nan")
        if self.paired:
            return statistics.median((a / b if self.higher_is_better else b / a)
                                     for a, b in zip(self.a_values, self.b_values))
        a, b = statistics.median(self.a_values), statistics.median(self.b_values)
        numerator, denominator = (a, b) if self.higher_is_better else (b, a)
        return numerator / denominator if denominator else float("nan")

    @property
    def spread(self) -> tuple[float, float] | None:
        """The lowest and highest ratio of one measurement pair (A and B were measured in turns, so pair i is
        A's and B's i-th run): how far one repetition can be from another. None without pairs."""
        if not (self.a_values and len(self.a_values) == len(self.b_values)):
            return None
        ratios = [(a / b if self.higher_is_better else b / a) for a, b in zip(self.a_values, self.b_values)]
        return min(ratios), max(ratios)

    @property
    def verdict(self) -> str | None:
        """Against the target, judged on the spread, not on one median: "met" when even the lowest pair's ratio
        reaches it, "MISSED" when not even the highest does (or the condition failed), else "unresolved" (this
        many repetitions cannot tell). None without a target."""
        if self.target is None:
            return None
        if self.condition is False:
            return "MISSED"
        low, high = self.spread or (self.ratio, self.ratio)
        return "met" if low >= self.target else "MISSED" if high < self.target else "unresolved"

    @property
    def met(self) -> bool | None:
        return None if self.verdict is None else self.verdict == "met"


def interleaved(a: Callable[[], float], b: Callable[[], float], repeats: int, warmup: int = 1
                ) -> tuple[list[float], list[float]]:
    """Run a, b alternately `repeats` times after `warmup` rounds; each returns its own measurement."""
    for _ in range(warmup):
        a(), b()
    a_values, b_values = [], []
    for i in range(repeats):
        if i % 2:  # alternate who goes first, so neither always inherits a warm cache
            b_values.append(b()), a_values.append(a())
        else:
            a_values.append(a()), b_values.append(b())
    return a_values, b_values


def timed(function: Callable[[], object]) -> float:
    tick = time.perf_counter()
    function()
    return time.perf_counter() - tick


# ---------------------------------------------------------------- data in the official formats

def mnist_format(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Uncompressed IDX files where torchvision's MNIST(root, download=False) looks for them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        # class-dependent blobs, so the models have something to learn
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for label in range(10):
            images[labels == label, 2 + 2 * label: 8 + 2 * label, 4:24] = 220
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + np.array([n, 28, 28], dtype=">u4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            b"\x00\x00\x08\x01" + np.array([n], dtype=">u4").tobytes() + labels.tobytes())
    return root


def prepared_from(images: torch.Tensor, labels: torch.Tensor, classes: int) -> data.PreparedData:
    """Our in-memory form of the same data (train = all of it; a small val split for the loop's evaluation)."""
    split = data.Split(images, labels)
    mean, std = data.channel_stats(split)
    val = data.Split(images[:512], labels[:512])
    return data.PreparedData(split, val, val, [str(i) for i in range(classes)], mean, std, md5="bench")


def tutorial_dataset(root: Path):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    return datasets.MNIST(root, train=True, download=False, transform=transform)


def tutorial_loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def tutorial_epoch(model: nn.Module, loader, optimizer, loss_fn) -> None:
    """The PyTorch tutorials' train loop: per-sample Dataset, DataLoader, loss.item() every step."""
    model.train()
    for inputs, labels in loader:
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()


# ---------------------------------------------------------------- comparisons

def cfg_for(model: str, **train):
    overrides = [f"model.name={model}", "train.device=cpu", "tracking.enabled=false", "train.scheduler=none"]
    overrides += [f"train.{key}={value}" for key, value in train.items()]
    return load_config(REPO / "params.yaml", overrides)


def our_epoch(cfg, prepared: data.PreparedData, device: torch.device):
    """One training epoch through the shared loop's train_one_epoch, on resident data; returns a timer."""
    model, train_batches, val_batches = training.setup(cfg, prepared, device)  # streamed: a DataLoader's workers
    trained = loop.Run(model, cfg.train, train_batches, val_batches)
    trained.start(device)  # on the device, in the configured memory format, with its optimizer
    dtype = trained.dtype(device)

    def run() -> float:
        tick = time.perf_counter()
        loop.train_one_epoch(model, trained, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tick
    return run


def compare_data_path(args, root: Path, prepared: data.PreparedData) -> list[Row]:
    dataset = tutorial_dataset(root)
    transform = batching.BatchTransform(prepared.mean, prepared.std, None)
    ours_batches = batching.TensorBatches(prepared.train, 64, transform, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))

    def ours() -> float:
        tick = time.perf_counter()
        seen = sum(len(y) for _, y in ours_batches)
        return seen / (time.perf_counter() - tick)

    rows = []
    for workers in (0, 2):
        loader = tutorial_loader(dataset, 64, workers)

        def reference() -> float:
            tick = time.perf_counter()
            seen = sum(len(y) for _, y in loader)
            return seen / (time.perf_counter() - tick)

        a, b = interleaved(ours, reference, args.repeats)
        rows.append(Row(f"data path, num_workers={workers}", "TensorBatches (resident uint8, batch transform)",
                        f"MNIST(ToTensor, Normalize) + DataLoader(64, shuffle, num_workers={workers})",
                        "samples/s", a, b, target=30, higher_is_better=True))
    return rows


def compare_epochs(args, root: Path, mnist: data.PreparedData, subset: data.PreparedData,
                   device: torch.device) -> list[Row]:
    """One epoch, same model/batch/optimizer type/samples: the MLP on all 60,000 images, the CNN (an epoch takes
    ~15 s here) on the first `len(subset)` of them; a ratio does not depend on the epoch's length."""
    dataset = tutorial_dataset(root)
    rows = []
    cases = [("mlp", "mlp (the tutorials' SimpleNN)", mnist, {}, 5.0, "defaults vs defaults"),
             ("cnn", "cnn (the tutorials' SimpleCNN)", subset, {}, 2.0, "our default format vs the tutorials' fp32"),
             ("cnn", "cnn (the tutorials' SimpleCNN)", subset, {"precision": "fp32", "channels_last": "false"}, 1.2,
              "same format (fp32, contiguous)")]
    for name, label, prepared, train, target, note in cases:
        loader = tutorial_loader(torch.utils.data.Subset(dataset, range(len(prepared.train))), 64, 0)
        cfg = cfg_for(name, batch_size=64, optimizer="adam", lr=1e-3, **train)
        ours = our_epoch(cfg, prepared, device)
        torch.manual_seed(0)
        model = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=cfg.train.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        a, b = interleaved(ours, lambda: timed(lambda: tutorial_epoch(model, loader, optimizer, loss_fn)),
                           args.repeats)
        rows.append(Row(f"epoch, {label}", f"shared loop ({describe_format(cfg, device)}, fused Adam)",
                        "tutorials' loop (fp32, Adam)", "s/epoch", a, b, target=target,
                        note=f"{note}; {len(prepared.train):,} images per epoch"))
    return rows


def jpeg_folder(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """`n` photo-like JPEGs (smooth colour fields plus noise, size x size, quality 90) in 10 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    for i in range(n):
        colour = rng.uniform(0, 255, (1, 1, 3))
        field = np.outer(ramp, rng.uniform(0.3, 1, size))[..., None] * colour + rng.normal(0, 12, (size, size, 3))
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def compare_folder(args, device: torch.device) -> list[Row]:
    """A folder of JPEGs: decoding by `prepare` (worker processes vs one process), and one CNN epoch on the
    decoded images streamed from a memory-mapped file (DataLoader workers) vs resident in memory."""
    from pipeline.datasets import folders

    n = 600 if args.quick else 20_000
    folder = jpeg_folder(Path(tempfile.mkdtemp(prefix="bench-folder-")), n)

    def decode(parallel_from: int) -> Callable[[], float]:
        def run() -> float:
            saved = folders.PARALLEL_FROM
            folders.PARALLEL_FROM = parallel_from  # 1: always worker processes; 10**9: never
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    seconds = timed(lambda: folders.load_folder(folder, 3, 32, skip_bad_images=False))
            finally:
                folders.PARALLEL_FROM = saved
            return n / seconds
        return run

    workers = processes.available_cores()
    a, b = interleaved(decode(1), decode(10 ** 9), args.repeats, warmup=0)
    rows = [Row("prepare, decode a JPEG folder", f"{workers} worker processes", "one process", "images/s", a, b,
                higher_is_better=True, note=f"{n:,} JPEGs 64x64 -> 32x32 RGB")]

    raw = folders.load_folder(folder, 3, 32, skip_bad_images=False)
    images_path = folder.parent / f"{folder.name}.u8"
    images_path.write_bytes(raw.train_images.numpy().tobytes())
    streamed_images = data.map_images(images_path, len(raw.train_images), [3, 32, 32])
    everything = torch.arange(len(raw.train_labels))
    resident = data.Split(raw.train_images, raw.train_labels)
    streamed = data.Split(streamed_images, raw.train_labels, everything)
    stats = data.channel_stats(resident)
    cfg = cfg_for("cnn", batch_size=64, optimizer="adam", lr=1e-3)
    epochs = [our_epoch(cfg, data.PreparedData(split, split, split, raw.classes, *stats, md5="bench"), device)
              for split in (streamed, resident)]
    a, b = interleaved(*epochs, args.repeats)
    rows.append(Row("epoch, streamed vs resident", f"streamed (memory-mapped, {cfg.data.loader_workers} "
                    "DataLoader workers)", "resident tensor", "s/epoch", a, b,
                    note=f"cnn, {describe_format(cfg, device)}; {n:,} images per epoch; page cache warm"))
    return rows


def describe_format(cfg, device) -> str:
    model = models.build_model(cfg.model, (1, 28, 28), 10)
    dtype = devices.autocast_dtype(cfg.train.precision, device, devices.has_convolutions(model))
    return (f"{str(dtype).removeprefix('torch.') if dtype else 'fp32'}"
            f"{', channels_last' if devices.uses_channels_last(cfg.train, model) else ''}")


def compare_lightning(args, mnist: data.PreparedData, subset: data.PreparedData, device: torch.device) -> list[Row]:
    try:
        import lightning as L
    except ImportError:
        return [Row("epoch vs Lightning (skipped)", "shared loop", "Lightning Trainer", "s/epoch", [float("nan")],
                    [float("nan")], note="skipped: pip install -e '.[bench]' (Lightning is an optional extra)")]
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Module(L.LightningModule):
        def __init__(self, net, lr):
            super().__init__()
            self.net, self.lr = net, lr

        def training_step(self, batch, _):
            inputs, labels = batch
            return nn.functional.cross_entropy(self.net(inputs), labels)

        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    rows = []
    for name, prepared, train, precision in (
            ("mlp", mnist, {}, "32-true"), ("cnn", subset, {"precision": "fp32", "channels_last": "false"}, "32-true"),
            ("cnn", subset, {}, "bf16-mixed")):
        cfg = cfg_for(name, batch_size=64, optimizer="adam", lr=1e-3, **train)
        ours = our_epoch(cfg, prepared, device)
        x = prepared.train.images.float().div(255).sub(prepared.mean[0]).div(prepared.std[0])
        dataset = torch.utils.data.TensorDataset(x, prepared.train.labels)

        def lightning() -> float:
            torch.manual_seed(0)
            net = models.build_model(cfg.model, prepared.input_shape, prepared.num_classes)
            trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator=device.type, devices=1, precision=precision)
            loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                tick = time.perf_counter()
                trainer.fit(Module(net, 1e-3), loader)
                return time.perf_counter() - tick

        a, b = interleaved(ours, lightning, args.repeats)
        rows.append(Row(f"epoch vs Lightning, {name}", f"shared loop ({describe_format(cfg, device)}, fused Adam)",
                        f"Lightning Trainer (TensorDataset + DataLoader, precision={precision}, Adam)", "s/epoch", a,
                        b, target=1.0, note=f"{len(prepared.train):,} images per epoch"))
    return rows


class EndTimed(loop.Callback):
    """Passes every hook to `inner`, timing its end-of-run work (the tracker's last flush: a cost per run, not per
    epoch) and, apart, its work at the end of each epoch."""

    def __init__(self, inner: loop.Callback):
        self.inner, self.end_seconds, self.epoch_seconds = inner, 0.0, 0.0

    def on_fit_start(self, model, history) -> None:
        self.inner.on_fit_start(model, history)

    def on_epoch_end(self, metrics) -> None:
        tick = time.perf_counter()
        self.inner.on_epoch_end(metrics)
        self.epoch_seconds += time.perf_counter() - tick

    def on_fit_end(self, result) -> None:
        tick = time.perf_counter()
        self.inner.on_fit_end(result)
        self.end_seconds = time.perf_counter() - tick


def compare_tracking(args, prepared: data.PreparedData, device: torch.device) -> list[Row]:
    """The same training with MLflow on and off: the cost per epoch, and the fixed cost per run (opening the run,
    its last flush of metrics, closing it). A digits epoch is short, so each measurement is a run of many epochs
    (a few percent of one short epoch is below a CPU's run-to-run noise), and the callback's own time per epoch is
    measured beside it."""
    from pipeline import tracking

    store = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    epochs = 3 if args.quick else 40
    cfg = cfg_for("mlp" if args.quick else "cnn", epochs=epochs).with_overrides({"tracking.enabled": True})
    # the default pipeline's data (digits): short epochs make the per-epoch cost of logging as visible as it gets
    tracking.connect(cfg.tracking)  # the schema is created once, before either side is timed
    fixed, inside = [], []

    def fit(callbacks) -> float:
        model, *batches = training.setup(cfg, prepared, device)
        tick = time.perf_counter()
        loop.fit(model, *batches, cfg.train, device, callbacks)
        return time.perf_counter() - tick

    def tracked() -> float:
        tick = time.perf_counter()
        run = tracking.TrackedRun(cfg, "bench", "bench", prepared.md5).__enter__()
        opened = time.perf_counter() - tick
        metrics = EndTimed(run.metrics)
        seconds = fit([metrics])
        tick = time.perf_counter()
        run.__exit__(None, None, None)
        fixed.append(opened + metrics.end_seconds + time.perf_counter() - tick)
        inside.append(metrics.epoch_seconds / epochs)
        return (seconds - metrics.end_seconds) / epochs

    untracked, on = interleaved(lambda: fit([]) / epochs, tracked, max(5 if args.quick else 7, args.repeats))
    overhead = (statistics.median(on) / statistics.median(untracked) - 1) * 100
    callback = statistics.median(inside) / statistics.median(untracked) * 100
    cost = Row("tracking, per epoch", "MLflow on (batched log_batch)", "MLflow off", "s/epoch", on, untracked,
               target=1 / 1.03,  # ours (tracked) may be at most 3% slower than the reference (untracked)
               note=f"overhead {overhead:+.1f}% per epoch over runs of {epochs} epochs (target <= 3%); the MLflow "
                    f"callback itself {1000 * statistics.median(inside):.2f} ms per epoch ({callback:.2f}% of one)")
    return [cost, Row("tracking, per run", "open run + params + tags, last flush, close run", "-", "s/run", fixed,
                      [], note="fixed cost, once per run")]


def compare_intervals(args) -> list[Row]:
    """What `evaluate` adds to a run for its 95% intervals (the bootstrap and Wilson's), on an MNIST-size test set
    of 10,000 images and 10 classes, against the 1 s a run may spend on them."""
    from pipeline import evaluation

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, 10_000)
    y_pred = np.where(rng.random(10_000) < 0.99, y_true, rng.integers(0, 10, 10_000))
    metrics = evaluation.classification_metrics(y_true, y_pred)
    matrix = evaluation.confusion(y_true, y_pred, 10)
    seconds = [timed(lambda: evaluation.with_intervals(metrics, matrix, seed)) for seed in range(max(5, args.repeats))]
    low, high = (evaluation.with_intervals(metrics, matrix, 0)[f"accuracy_ci95_{bound}"] for bound in ("low", "high"))
    return [Row("evaluate, 95% intervals", f"bootstrap ({evaluation.RESAMPLES:,} resamples) + Wilson", "budget",
                "s/run", seconds, [1.0] * len(seconds), target=1.0,
                note=f"10,000 test images at accuracy {metrics['accuracy']:.4f}: [{low:.4f}, {high:.4f}] "
                     f"(+-{(high - low) / 2 * 100:.2f} points)")]


class SearchRun(NamedTuple):
    seconds: float
    epochs: int  # trained, over every trial
    best: float  # the best trial's value
    params: dict  # the best trial's params
    passes: int  # training steps as the loop took them: one forward pass computes a population's fused trials
    longest: int  # the most steps one trial took


@contextlib.contextmanager
def counting_passes():
    """Counts a population's training forward passes (its `engine.train_one_epoch` takes one per batch of a
    group, fused or alone), in all and per trial: yields {"passes": int, "trials": {id: [run, steps]}}.

    A device that waits on its host (a GPU running small models) spends about as long on a step of 16 fused
    trials as on a step of one, at any batch size. There a population can be at most (one trial at a time's
    passes) / (its passes) times faster: the bound set by which trials it could train together. And no schedule
    beats (one trial at a time's passes) / (its longest trial's steps), which that trial takes one after another.
    (On a CPU a step's cost grows with its batch and its trials: these bound nothing there.)
    """
    counts = {"passes": 0, "trials": {}}
    engine = population.engine
    original = engine.train_one_epoch

    def counting(forward, group, *args, **kwargs):
        steps = len(group[0].train_batches)  # a group's runs share their batch size and data
        counts["passes"] += steps
        for run in group:  # the run is kept: its id stays its own
            counts["trials"].setdefault(id(run), [run, 0])[1] += steps
        return original(forward, group, *args, **kwargs)

    engine.train_one_epoch = counting  # the engine looks it up at each epoch
    try:
        yield counts
    finally:
        engine.train_one_epoch = original


def run_search(prepared: data.PreparedData, overrides: list[str]) -> SearchRun:
    """One untracked search on `prepared` in a throwaway folder."""
    from pipeline import tuning

    journal = Path(tempfile.mkdtemp(prefix="bench-tune-")) / "s.journal"
    cfg = load_config(REPO / "params.yaml", [f"tune.storage={journal}", "tracking.enabled=false", *overrides])
    prepared_dir = journal.parent / "prepared"
    data.save_prepared(prepared_dir, {"train": prepared.train, "val": prepared.val, "test": prepared.test},
                       prepared.classes, "bench")
    tick = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(journal.parent)  # the search writes reports/tune/ where it runs
    try:
        with contextlib.redirect_stdout(io.StringIO()), counting_passes() as passes:
            record = tuning.tune(cfg, prepared_dir, worker_args=[])
            seconds = time.perf_counter() - tick
            study = tuning.open_search(cfg, prepared_dir).study
    finally:
        os.chdir(cwd)
    return SearchRun(seconds, sum(len(t.intermediate_values) for t in study.trials), record["value"],
                     record["params"], passes["passes"],  # no population ran under Ray Tune: no fused passes
                     max((steps for _, steps in passes["trials"].values()), default=0))


def retrain_noise(prepared: data.PreparedData, search: SearchRun, overrides: list[str], seeds: int) -> float:
    """How far a search's best score moves by luck alone (initial weights, batch order, dropout): the stdev of the
    best trial's params trained again as a trial, once per other seed. Two searches' best scores are compared
    within it."""
    from pipeline import tuning

    cfg = load_config(REPO / "params.yaml", ["tracking.enabled=false", *overrides])
    values = []
    for seed in range(1, seeds + 1):
        trial = tuning.trial_config(cfg, {**search.params, "seed": cfg.seed + seed})
        device = devices.resolve_device(trial.train.device)
        model, *batches = training.setup(trial, prepared, device)
        values.append(loop.fit(model, *batches, trial.train, device, []).best_score)
    return statistics.stdev(values)


def compare_pruning(args, prepared: data.PreparedData, device: torch.device) -> list[Row]:
    """The default search (its pruner) and the same search without pruning, one trial at a time: epochs trained,
    and the best validation score, within the noise of retraining the unpruned search's best params."""
    quick = ["tune.n_trials=6", "tune.epochs=4", "tune.startup_trials=2", "tune.warmup_epochs=1"] if args.quick else []
    common = [f"train.device={device.type}", "tune.population=1", *quick]
    pruner = DEFAULTS.tune.pruner
    pruned, full = run_search(prepared, common), run_search(prepared, ["tune.pruner=none", *common])
    noise = retrain_noise(prepared, full, common, 2 if args.quick else 5)
    within = abs(pruned.best - full.best) <= noise
    row = Row("search, pruning", f"{pruner} pruner", "no pruning", "epochs/search", [pruned.epochs], [full.epochs],
              target=2.0, condition=within,
              note=f"{pruned.epochs / full.epochs:.0%} of the epochs (target <= 50%); best val_loss "
                   f"{pruned.best:.4f} vs {full.best:.4f}, {'within' if within else 'MISSED: beyond'} the noise "
                   f"(stdev {noise:.4f}: the unpruned best params retrained with other seeds); "
                   f"{pruned.seconds:.1f} s vs {full.seconds:.1f} s; one trial at a time",
              extra={"seconds": [pruned.seconds, full.seconds], "best": [pruned.best, full.best],
                     "noise_stdev": noise})
    return [row]


def compare_ray(args, prepared: data.PreparedData, device: torch.device) -> list[Row]:
    """The same search, one trial at a time with the cores' threads, run by this repo's Optuna engine and by Ray
    Tune (tune.engine: ray): seconds per epoch trained, and Ray's cost per trial beyond training (its wall time
    less its start-up and its epochs at the Optuna engine's rate, over its trials)."""
    import ray

    size = ["tune.n_trials=6", "tune.epochs=3"] if args.quick else ["tune.n_trials=12", "tune.epochs=5"]
    common = [f"train.device={device.type}", "tune.population=1", "tune.startup_trials=2", "tune.warmup_epochs=1",
              "tune.confirm=0", f"tune.resources.cpu={args.threads}", *size]
    tick = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.shutdown()
    startup = time.perf_counter() - tick
    ours, theirs = run_search(prepared, common), run_search(prepared, ["tune.engine=ray", *common])
    per_epoch = ours.seconds / ours.epochs
    trials = int(next(item for item in size if item.startswith("tune.n_trials")).split("=")[1])
    overhead = (theirs.seconds - startup - theirs.epochs * per_epoch) / trials
    trial = theirs.seconds / trials
    return [Row("search, Ray Tune engine", "optuna engine", "ray engine", "s/epoch", [per_epoch],
                [theirs.seconds / theirs.epochs],
                note=f"Ray's cost per trial beyond training {overhead:.2f} s ({overhead / trial:.0%} of its mean trial "
                     f"{trial:.1f} s; Ray publishes about 14% for 10,000 one-second trials), plus {startup:.1f} s to "
                     f"start Ray; {trials} trials of {size[1].split('=')[1]} epochs, one at a time, "
                     f"{ours.epochs} vs {theirs.epochs} epochs trained (successive halving vs ASHA)",
                extra={"seconds": [ours.seconds, theirs.seconds], "epochs": [ours.epochs, theirs.epochs],
                       "ray_startup_seconds": startup, "ray_overhead_per_trial_seconds": overhead})]


def compare_population(args, digits_data: data.PreparedData, mnist: data.PreparedData, device: torch.device
                       ) -> list[Row]:
    """The same search (space, seed, trials, epochs, pruner) with one trial at a time vs tune.population trials
    at once, K swept: wall time and best validation score. Digits: the default search. MNIST-format: a smaller
    search on a subset, so that it fits the benchmark's time."""
    gpu = device.type == "cuda"
    sizes = sorted({1, *args.sizes} if args.sizes else
                   {1, DEFAULT_POPULATION, *([] if args.quick else [8, 24] if gpu else [4, 8, 16])})
    small = ["tune.n_trials=6", "tune.epochs=3", "tune.startup_trials=2", "tune.warmup_epochs=1"]
    n = 500 if args.quick else (10_000 if gpu else 5_000)
    images, labels = mnist.train.images, mnist.train.labels
    held_out = data.Split(images[n:n + 2_000], labels[n:n + 2_000])  # val: images the search never trains on
    subset = dataclasses.replace(prepared_from(images[:n], labels[:n], mnist.num_classes), val=held_out,
                                 test=held_out)
    cases = [("digits, cnn", digits_data, ["model.name=cnn"], "the default search"),
             ("digits, mlp", digits_data, ["model.name=mlp"], "the default search, MLP"),
             ("MNIST-format, cnn", subset, ["model.name=cnn", "tune.n_trials=12", "tune.epochs=4",
                                            "tune.startup_trials=3", "tune.warmup_epochs=1"],
              f"12 trials x 4 epochs on {n:,} images (synthetic blobs: time only, every search nears 0 loss)"),
             ("MNIST-format, mlp", subset, ["model.name=mlp", "tune.n_trials=12", "tune.epochs=4",
                                            "tune.startup_trials=3", "tune.warmup_epochs=1"],
              f"12 trials x 4 epochs on {n:,} images")]
    seed = DEFAULTS.seed
    rows = []
    for name, prepared, overrides, what in cases[::2] if args.quick else cases:  # quick: the CNNs
        common = [*overrides, f"train.device={device.type}", *(small if args.quick else [])]
        default = name == "digits, cnn"
        # The default search, judged: with three seeds (a search's speed depends on which trials it happens to
        # prune), and its best scores compared within the noise of retraining the sequential best params.
        seeds = [seed] if args.quick or not default else [seed, seed + 1, seed + 2]
        runs: dict[int, list[SearchRun]] = {size: [] for size in sizes}
        for i, each in enumerate(seeds):  # interleaved: the sizes of one seed run back to back, in turns first
            for size in sizes if i % 2 == 0 else sizes[::-1]:
                if i == 0 or size in (1, DEFAULT_POPULATION):
                    runs[size].append(run_search(prepared, [*common, f"tune.population={size}", f"seed={each}"]))
        sequential = runs[1]
        noise = retrain_noise(prepared, sequential[0], common, 2 if args.quick else 5) if default else None
        for size in sizes[1:]:
            together = runs[size]
            paired = list(zip(together, sequential))
            within = None if noise is None else all(abs(a.best - b.best) <= noise for a, b in paired)
            judged = (default and size == DEFAULT_POPULATION) or (gpu and "cnn" in name)
            best = ", ".join(f"{a.best:.4g} vs {b.best:.4g}" for a, b in paired)
            epochs = ", ".join(f"{a.epochs} vs {b.epochs}" for a, b in paired)
            # which trials a search trains (batch sizes, how many pruned) moves its wall time as much as the speed
            # of an epoch does: both are shown
            per_epoch = ", ".join(f"{1000 * a.seconds / a.epochs:.0f} vs {1000 * b.seconds / b.epochs:.0f}"
                                  for a, b in paired)
            # ...and which of them it could train together bounds the speed-up whatever a step costs (see
            # `counting_passes`): the ratio of forward passes, and of the sequential passes to the longest trial
            passes = ", ".join(f"{a.passes} vs {b.passes}" for a, b in paired)
            schedule = statistics.median(b.passes / a.passes for a, b in paired)
            longest = statistics.median(b.passes / a.longest for a, b in paired)
            each = ", ".join(f"{b.seconds / a.seconds:.2f}x" for a, b in paired)
            ratios = f"ratios {each}; " if len(paired) > 1 else ""
            rows.append(Row(f"search, {name}, population {size}", f"{size} trials at once", "one trial at a time",
                            "s/search", [a.seconds for a, _ in paired], [b.seconds for _, b in paired],
                            target=(10.0 if gpu else 1.5) if judged else None, condition=within if judged else None,
                            paired=True,
                            note=f"{what}{f', seeds {seeds}' if len(paired) > 1 else ''}; {ratios}best val_loss {best}"
                                 + ("" if noise is None else f" ({'within' if within else 'MISSED: beyond'} the "
                                                             f"noise, stdev {noise:.4f})")
                                 + f"; epochs {epochs}; ms per epoch trained {per_epoch}; forward passes {passes}:"
                                 f" were every step to cost the same (a GPU waiting on its host), at most "
                                 f"{schedule:.2f}x with this schedule, {longest:.2f}x with any (its longest trial)",
                            extra={"best": [[a.best, b.best] for a, b in paired],
                                   "epochs": [[a.epochs, b.epochs] for a, b in paired],
                                   "passes": [[a.passes, b.passes] for a, b in paired],
                                   "longest": [a.longest for a in together],
                                   "bounds": {"schedule": schedule, "any_schedule": longest},
                                   **({"noise_stdev": noise} if noise is not None else {})}))
    return rows


def compare_replicates(args, prepared: data.PreparedData, device: torch.device) -> list[Row]:
    """A model's seed replicates (the default 3) trained as one population, as `train` does, vs one after another
    through `loop.fit`: wall time for the same epochs, each side's models built before its clock starts."""
    gpu = device.type == "cuda"
    epochs, replicates = (2 if args.quick else 10), DEFAULTS.replicates
    # a GPU computes the fused group in about the time of one member: 3 replicates in at most 1.3x one's time
    target = replicates / 1.3 if gpu else 1.3
    rows = []
    for model in ("cnn", "mlp"):
        cfg = load_config(REPO / "params.yaml", [f"model.name={model}", f"train.device={device.type}",
                                                 f"train.epochs={epochs}", "tracking.enabled=false"])
        members = training.replicate_configs(cfg)

        def built() -> list[loop.Run]:
            runs = []
            for each in members:
                model_, train_batches, val_batches = training.setup(each, prepared, device)
                runs.append(loop.Run(model_, each.train, train_batches, val_batches))
            return runs

        def together() -> float:
            runs = built()
            return timed(lambda: (population.fit_together(runs, device), synchronize(device)))

        def one_after_another() -> float:
            runs = built()
            return timed(lambda: ([loop.fit_run(run, device) for run in runs], synchronize(device)))

        a, b = interleaved(together, one_after_another, args.repeats)
        rows.append(Row(f"replicates, digits {model}", f"{replicates} seeds as one population",
                        "one after another", "s/model", a, b, target=target,
                        note=f"{epochs} epochs each, the default params; what `train` does per model"))
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare_pipeline(args) -> list[Row]:
    """`dvc repro` from scratch in a throwaway copy of this repo, each stage timed, and the no-op `dvc repro`."""
    work = Path(tempfile.mkdtemp(prefix="bench-repro-"))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import copy_repo, edit_params

    repo = copy_repo(work / "repo")
    if args.quick:  # every stage still runs, on tiny settings and without MLflow
        edit_params(repo, {"train.epochs": 2, "tune.n_trials": 2, "tune.epochs": 2, "comparison": ["logreg"],
                           "model.name": "logreg", "tracking.enabled": False})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    tick = time.perf_counter()
    stages, _ = stage_seconds([sys.executable, "-m", "dvc", "repro"], repo, env)
    scratch = time.perf_counter() - tick
    noop = [timed(lambda: subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env,
                                         capture_output=True, check=True)) for _ in range(args.repeats)]
    imports = {} if args.quick else {  # what every stage process pays before it works
        module: timed(lambda m=module: subprocess.run([sys.executable, "-c", f"import {m}"], cwd=repo, check=True))
        for module in ("pipeline.cli", "torch", "mlflow", "pipeline.tracking", "pipeline.tuning")}
    return [Row("pipeline, dvc repro from scratch", "default params" if not args.quick else "tiny params", "target",
                "s", [scratch], [60.0], target=1.0, extra={"stages_s": stages, "imports_s": imports},
                note="target <= 60 s on an idle 2-core machine; seconds by stage, its process's start included: "
                     + ", ".join(f"{stage} {seconds:g}" for stage, seconds in stages.items())),
            Row("pipeline, no-op dvc repro", "up to date", "target", "s", noop, [1.5], target=1.0,
                note="target <= 1.5 s")]


def stage_seconds(command: list[str], cwd: Path, env: dict) -> tuple[dict[str, float], str]:
    """Run `dvc repro` and time each stage, from one "Running stage" line to the next (its process's imports
    included: what the user waits for)."""
    seconds, output, stage, started = {}, [], None, time.perf_counter()
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            output.append(line)
            if line.startswith("Running stage '"):
                now = time.perf_counter()
                if stage:
                    seconds[stage] = round(now - started, 1)
                stage, started = line.split("'")[1], now
    if process.returncode:
        raise RuntimeError("".join(output))
    if stage:
        seconds[stage] = round(time.perf_counter() - started, 1)
    return seconds, "".join(output)


def compare_gpu(args, device: torch.device) -> list[Row]:
    """CUDA only: formats (fp32, bf16, channels_last, torch.compile) for the CNN and a CIFAR-format ResNet-18;
    images/s and the share of the GPU's dense bf16 peak, against fp32 as the reference."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 5_000 if args.quick else 50_000
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    cifar = prepared_from(images, torch.randint(0, 10, (n,), generator=generator), 10)
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16 FLOP/s (vendor figures)
    peak = next((value for key, value in peaks.items() if key in torch.cuda.get_device_name()), None)
    rows = []
    for name in ("cnn", "resnet18"):
        cfg32 = cfg_for(name, batch_size=512, optimizer="adam", lr=1e-3, precision="fp32", channels_last="false",
                        device="cuda")
        reference = our_epoch(cfg32, cifar, device)
        model = models.build_model(cfg32.model, (3, 32, 32), 10).to(device)
        batch = torch.randn(512, 3, 32, 32, device=device)
        with FlopCounterMode(display=False) as counter:
            model(batch).sum().backward()
        flops_per_image = counter.get_total_flops() / 512
        for label, train in (("bf16", {"precision": "bf16", "channels_last": "false"}),
                             ("bf16 + channels_last", {"precision": "bf16", "channels_last": "true"}),
                             ("bf16 + channels_last + compile", {"precision": "bf16", "channels_last": "true",
                                                                 "compile": "true"})):
            cfg = cfg_for(name, batch_size=512, optimizer="adam", lr=1e-3, device="cuda", **train)
            a, b = interleaved(our_epoch(cfg, cifar, device), reference, args.repeats)
            rate = n / statistics.median(a)
            share = f", {rate * flops_per_image / peak:.1%} of the bf16 peak" if peak else ""
            rows.append(Row(f"gpu, {name}, {label}", f"shared loop ({label})", "shared loop (fp32)", "s/epoch", a, b,
                            note=f"{rate:,.0f} images/s{share}; {n:,} CIFAR-format images, batch 512"))
    rows.append(Row("gpu, airbench reference", "-", "airbench94 on one A100: 94% CIFAR-10 in 3.83 s (~10 epochs)",
                    "s", [float("nan")], [3.83], note="compare the ResNet-18 rows' s/epoch with ~0.38 s/epoch"))
    return rows


# ---------------------------------------------------------------- output

def table(rows: list[Row]) -> str:
    lines = [f"{'comparison':<34} {'ours (median [min, max])':>28} {'reference':>28} {'ratio':>7} {'pairs':>13} "
             f"{'target':>7}"]
    for row in rows:
        spread = f"[{row.spread[0]:.2f}, {row.spread[1]:.2f}]" if row.spread else ""
        target = "" if row.target is None else f">={row.target:.2f} {row.verdict}"
        lines.append(f"{row.name:<34} {cell(row.a_values):>28} {cell(row.b_values):>28} {row.ratio:>7.2f} "
                     f"{spread:>13} {target}" + (f"  ({row.unit})" if row.unit else ""))
        if row.note:
            lines.append(f"{'':<34} {row.note}")
    return "\n".join(lines)


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.4g} [{min(values):.3g}, {max(values):.3g}]"


def device_results(rows: list[Row], sections: dict[str, str], machine: str, device: str) -> dict:
    """What one device's rows say, with the machine, versions, date and commit that produced them."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"machine": machine, "device": device, "date": time.strftime("%Y-%m-%d"),
            "commit": commit.stdout.strip() or "unknown", "python": platform.python_version(),
            "torch": torch.__version__,
            "comparisons": [{**asdict(row), "section": sections.get(row.name, ""), "ratio": row.ratio,
                             "spread": row.spread, "verdict": row.verdict, "met": row.met,
                             "median_a": statistics.median(row.a_values) if row.a_values else None,
                             "median_b": statistics.median(row.b_values) if row.b_values else None}
                            for row in rows]}


def render_page(results: list[dict]) -> str:
    """docs/performance.md: one table per device, each under one line naming the machine, the versions, the date
    and the commit; nothing else (every number on it is one `make bench` run's)."""
    lines = ["# Performance", "",
             "Written by `make bench` (`benchmarks/bench.py`), never by hand: one table per device it ran on. Each "
             "comparison runs ours (A) and the reference (B) in turns with the same model, data, batch size and "
             "threads; *ratio* is B/A of the medians (above 1: ours is faster; a search with its own seed per pair: "
             "the median of the pairs' ratios), *pairs* the lowest and highest ratio of one pair. A target is "
             "judged on the pairs: *met* when the lowest reaches it, *MISSED* when the highest does not, "
             "*unresolved* in between.", ""]
    for result in sorted(results, key=lambda each: each["device"]):
        lines += [f"## {result['device']}", "",
                  f"{result['machine']}; Python {result['python']}, torch {result['torch']}; measured "
                  f"{result['date']} at commit {result['commit']}.", "",
                  "| comparison | ours (A) | reference (B) | unit | A: median [min, max] | B: median [min, max] | "
                  "ratio | pairs | target |", "|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for row in result["comparisons"]:
            spread = "" if not row.get("spread") else f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}"
            target = "" if row["target"] is None else f"≥{row['target']:.2f}: {row.get('verdict')}"
            lines.append(" | ".join(["", row["name"], row["a"], row["b"] or "-", row["unit"], cell(row["a_values"]),
                                     cell(row["b_values"]), f"{row['ratio']:.2f}", spread, target, ""]).strip())
            if row["note"]:
                notes.append(f"- **{row['name']}**: {row['note']}")
        lines += ["", *notes, ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI (checks everything runs)")
    parser.add_argument("--repeats", type=int, default=None, help="measured repetitions per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default=None, help="comma-separated sections (default: every CPU section, and "
                                                     "the GPU sections where CUDA is available)")
    parser.add_argument("--sizes", type=lambda text: [int(size) for size in text.split(",")], default=None,
                        help="population sizes K to sweep, e.g. 16 (default: CPU 4,8,16; GPU 8,16,24), each against "
                             "one trial at a time")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write every row to this JSON (default: none; a full run writes docs/bench/)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every comparison ran and wrote its numbers (CI; never checks timings)")
    args = parser.parse_args()
    if args.check and not args.out:
        parser.error("--check reads what --out wrote: give --out")
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    n_train = 2_000 if args.quick else 60_000
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    mnist_format(root, n_train, 1_000)
    dataset = tutorial_dataset(root)
    images = dataset.data.unsqueeze(1).contiguous()
    mnist = prepared_from(images, dataset.targets, 10)
    subset = mnist if args.quick else prepared_from(images[:20_000], dataset.targets[:20_000], 10)
    wanted = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    sections = [("data", lambda: compare_data_path(args, root, mnist)),
                ("mlp", lambda: compare_epochs(args, root, mnist, subset, device)),
                ("lightning", lambda: compare_lightning(args, mnist, subset, device)),
                ("folder", lambda: compare_folder(args, device)),
                ("tracking", lambda: compare_tracking(args, digits(), device)),
                ("intervals", lambda: compare_intervals(args)),
                ("search", lambda: compare_pruning(args, digits(), device)),
                ("population", lambda: compare_population(args, digits(), mnist, device)),
                ("ray", lambda: compare_ray(args, digits(), device)),
                ("replicates", lambda: compare_replicates(args, digits(), device)),
                ("pipeline", lambda: compare_pipeline(args))]
    if torch.cuda.is_available():  # the GPU set, on top of the CPU comparisons
        sections.append(("gpu", lambda: compare_gpu(args, torch.device("cuda"))))
        sections.append(("gpu-population", lambda: compare_population(args, digits(), mnist, torch.device("cuda"))))
        sections.append(("gpu-replicates", lambda: compare_replicates(args, digits(), torch.device("cuda"))))
    section_of: dict[str, str] = {}
    for name, section in sections:
        if wanted is None or name in wanted:
            tick = time.perf_counter()
            done = section()
            rows += done
            section_of.update((row.name, name) for row in done)
            print(f"[bench] {name}: {time.perf_counter() - tick:.0f}s\n{table(done)}", file=sys.stderr, flush=True)
    cpu = (f"{cpu_name()}, {processes.available_cores()} cores, {args.threads} thread(s), "
           f"{'quick' if args.quick else 'default'} sizes")
    print(cpu)
    print(table(rows))
    gpu_rows = [row for row in rows if section_of[row.name].startswith("gpu")]
    measured = [device_results([row for row in rows if row not in gpu_rows], section_of, cpu, "CPU")]
    if gpu_rows:
        measured.append(device_results(gpu_rows, section_of, f"{torch.cuda.get_device_name()} (host: {cpu})",
                                       f"GPU: {torch.cuda.get_device_name()}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**measured[0], "devices": measured, "quick": args.quick}, indent=2,
                                       default=str) + "\n")
    if not args.quick and not args.only:  # a full run: its devices' numbers replace theirs on the page
        RESULTS.mkdir(parents=True, exist_ok=True)
        for result in measured:
            name = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        PAGE.write_text(render_page([json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]))
        print(f"bench: wrote {PAGE}", file=sys.stderr)
    return check(args.out) if args.check else 0


def cpu_name() -> str:
    """The processor's model name (platform.processor() is often just the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


EXPECTED = ("data path, num_workers=0", "data path, num_workers=2", "epoch, mlp", "epoch, cnn", "epoch vs Lightning",
            "prepare, decode a JPEG folder", "epoch, streamed vs resident",
            "tracking, per epoch", "tracking, per run", "evaluate, 95% intervals", "search, pruning",
            "search, Ray Tune engine", "search, digits, cnn, population",
            "search, MNIST-format, cnn, population", "pipeline, dvc repro from scratch",
            "pipeline, no-op dvc repro")


def check(path: Path) -> int:
    """Every comparison is in the JSON with its numbers and the machine facts (values are not judged)."""
    results = json.loads(path.read_text())
    missing = [name for name in EXPECTED if not any(c["name"].startswith(name) for c in results["comparisons"])]
    empty = [c["name"] for c in results["comparisons"]
             if not c["a_values"] or ("skipped" not in c["note"] and c["median_a"] is None)]
    facts = [key for key in ("machine", "device", "torch", "date", "commit") if not results.get(key)]
    if missing or empty or facts:
        print(f"bench: incomplete {path}: missing {missing}, without numbers {empty}, without {facts}",
              file=sys.stderr)
        return 1
    print(f"bench: {path} holds all {len(results['comparisons'])} comparisons")
    return 0


def digits() -> data.PreparedData:
    from pipeline.datasets import digits as bundled

    cfg = load_config(REPO / "params.yaml")
    raw = bundled.load_digits()
    splits = data.split_dataset(raw.train_images, raw.train_labels, raw.classes, cfg.data, cfg.data.split_seed)
    mean, std = data.channel_stats(splits["train"])
    return data.PreparedData(**splits, classes=raw.classes, mean=mean, std=std, md5="bench-digits")


if __name__ == "__main__":
    raise SystemExit(main())
