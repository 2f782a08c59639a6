"""The one training loop: every run, trial, seed replicate and DDP rank trains through it.

`fit` trains one model, in the shape of torchvision's reference script: per
epoch `train_one_epoch`, then `evaluate` on the validation batches, then the
run's end of epoch (`Run.end_epoch`: schedule, best weights, resume point,
callbacks), until its epochs are done or early stopping fires. It knows
nothing of MLflow or Optuna: it reports through `Callback` hooks, so tracking
and pruning plug in from outside. Per step it never syncs with the host:
losses and hits accumulate on the device and are read once per epoch.

A population of same-shaped runs (`pipeline.population`) keeps each run's
`Run` as it is here and computes several runs' steps in one forward pass.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import devices, distributed, files, optim, processes
from pipeline.config import TrainConfig
from pipeline.errors import UserError, first_line, shorten
from pipeline.metrics import EpochMetrics, is_better, worst


class Callback:
    """Hooks the loop calls. Raising from `on_epoch_end` stops training (e.g. a pruned trial)."""

    def on_fit_start(self, model: nn.Module, history: list[EpochMetrics]) -> None:
        """`history`: the epochs a resumed run already has (empty when it starts fresh)."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        pass

    def on_fit_end(self, result: FitResult) -> None:
        pass


@dataclass
class FitResult:
    """A finished run: `best_epoch` is the one that ships (its weights `best_state`), and `best_score` what the run
    is judged on: the monitored value averaged over the window that epoch ends (`smoothed`)."""

    history: list[EpochMetrics]
    best_epoch: int
    best_score: float
    best_state: dict[str, torch.Tensor] = field(repr=False)
    stopped_early: bool
    seconds: float

    @property
    def best(self) -> EpochMetrics:
        return self.history[self.best_epoch - 1]


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf: the params made the run diverge (Optuna fails such a trial)."""


# ---------------------------------------------------------------- checkpoints

class Checkpoints:
    """The resume point of one training run: `<directory>/<key>.pt`, rewritten after every epoch.

    `key` names everything the result depends on (the caller builds it from the
    config, the data and the code), so a resume point is only ever picked up by
    the same run, and runs with other keys never touch it. The caller removes
    it once the run's outputs are written: a finished run is never resumed.
    `meta` travels with the state (e.g. the tracking run to continue).
    """

    def __init__(self, directory: Path, key: str, meta: dict | None = None, writer: bool = True,
                 family: str | None = None):
        self.directory, self.key, self.meta = Path(directory), key, dict(meta or {})
        self.family = family or key  # the keys of runs trained with this one (seed replicates: <family>-r<i>)
        self.writer = writer  # of several ranks, one writes (and speaks); all read
        self._loaded: dict | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"{self.key}.pt"

    def load(self) -> dict | None:
        """The saved state of this run, or None; says so when it ignores resume points of other runs."""
        if self._loaded is None and self.path.exists():
            self._loaded = self._read(self.path)
            self.meta = {**self._loaded.get("meta", {}), **self.meta}
        elif self._loaded is None:
            others = sorted(path for path in self.directory.glob("*.pt")
                            if path.stem != self.family and not path.stem.startswith(f"{self.family}-r")) \
                if self.directory.is_dir() else []
            if others and self.writer:
                print(f"starting fresh: {len(others)} resume point(s) in {self.directory} belong to another "
                      "config, data or code version (kept for their own runs)", file=sys.stderr)
        return self._loaded

    def _read(self, path: Path) -> dict:
        try:
            with warnings.catch_warnings():  # torch warns about odd bytes before it refuses them: one line is enough
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            missing = {"epoch", "model", "optimizer", "history", "rng"} - set(state)
        except Exception as err:  # noqa: BLE001 - truncated, empty or foreign bytes all mean "unusable"
            missing, reason = None, shorten(first_line(err), 80)
        else:
            reason = f"it lacks {', '.join(sorted(missing))}" if missing else ""
        if missing is None or missing:
            raise UserError(f"resume point {path} is unreadable ({reason}): delete it to train from scratch")
        return state

    def save(self, state: dict) -> None:
        if self.writer:
            files.save_torch({**state, "meta": self.meta}, self.path)

    def clear(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- one run

@dataclass(eq=False)
class Run:
    """One training run: its model, config, batches, callbacks and resume point (the caller's), and the state
    training gives it (`start`: optimizer, schedule, loss; then history and best weights, epoch by epoch).

    `key` is the caller's own handle (e.g. an Optuna trial). `result` is set
    when the run ends normally; `error` when an exception ended it inside a
    population (alone, `fit` raises it).
    """

    model: nn.Module
    cfg: TrainConfig
    train_batches: Any
    val_batches: Any
    callbacks: Sequence[Callback] = ()
    checkpoints: Checkpoints | None = None
    key: Any = None
    result: FitResult | None = None
    error: Exception | None = None
    optimizer: torch.optim.Optimizer = field(init=False, repr=False)
    scheduler: Any = field(init=False, default=None, repr=False)
    step_per_batch: bool = field(init=False, default=False, repr=False)
    scaler: torch.amp.GradScaler = field(init=False, repr=False)
    criterion: nn.Module = field(init=False, repr=False)
    history: list[EpochMetrics] = field(init=False, default_factory=list, repr=False)
    best_epoch: int = field(init=False, default=0, repr=False)
    best_score: float = field(init=False, default=math.nan, repr=False)
    best_state: dict[str, torch.Tensor] = field(init=False, default_factory=dict, repr=False)
    bad_epochs: int = field(init=False, default=0, repr=False)
    lr: float = field(init=False, default=math.nan, repr=False)  # the lr this epoch started at
    started: float = field(init=False, default=0.0, repr=False)

    @property
    def ended(self) -> bool:
        return self.result is not None or self.error is not None

    def dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype this run computes in on `device` (None: fp32)."""
        return devices.autocast_dtype(self.cfg.precision, device, devices.has_convolutions(self.model))

    def start(self, device: torch.device, world: distributed.World = distributed.World()) -> None:
        """The model on the device in its memory format, its optimizer, schedule and loss, its resume point if any,
        and its callbacks' on_fit_start. A resumed run may be over already (`result` set)."""
        model, cfg = self.model, self.cfg
        model.to(device)
        if devices.uses_channels_last(cfg, model):
            model.to(memory_format=torch.channels_last)
        if set_epoch := getattr(model, "set_epoch", None):  # the model's own schedule (a backbone's freezing)
            set_epoch(1)  # before DDP wraps it: DDP syncs the parameters that need gradients at that moment
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype(device) == torch.float16)
        # several ranks sum their slice's losses (see train_one_epoch); one process averages as usual
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                             reduction="sum" if world.distributed else "mean")
        self.optimizer = optim.build_optimizer(optim.parameter_groups(model, cfg), cfg)
        self.scheduler, self.step_per_batch = optim.build_scheduler(self.optimizer, cfg, len(self.train_batches))
        self.best_score = worst(cfg.monitor)
        resumed = self.checkpoints.load() if (self.checkpoints and cfg.resume) else None
        if resumed:
            self._resume(resumed)
        for callback in self.callbacks:
            callback.on_fit_start(model, list(self.history))
        self.started = time.perf_counter()
        self._finish_if_done()

    def _resume(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.history = [EpochMetrics(**row) for row in state["history"]]
            self.best_epoch, self.best_score = state["best_epoch"], state["best_score"]
            self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.train_batches.load_state_dict(state["rng"]["batches"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:  # keys right, contents not
            reason = shorten(first_line(err), 80)
            raise UserError(f"resume point {self.checkpoints.path} does not fit this run ({reason}): delete it to "
                            "train from scratch") from None
        print(f"resuming from {self.checkpoints.path} after epoch {len(self.history)}", file=sys.stderr)

    def begin_epoch(self) -> None:
        """Before the epoch's first step: the model's own schedule, and the lr the epoch starts at."""
        if set_epoch := getattr(self.model, "set_epoch", None):
            set_epoch(len(self.history) + 1)
        self.lr = self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """The optimizer's step on this run's gradients: clipped as configured, scaled (fp16), and the schedule's
        step where it steps per batch."""
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.step_per_batch:
            self.scheduler.step()

    def end_epoch(self, trained: tuple[float, float, int], validated: tuple[float, float], seconds: float) -> None:
        """After the epoch: its metrics, the schedule, the best weights, the resume point, the callbacks; and the
        run's result once its epochs are done (or early stopping fires)."""
        (train_loss, train_accuracy, seen), (val_loss, val_accuracy) = trained, validated
        cfg, epoch = self.cfg, len(self.history) + 1
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} (lr={self.lr:g})")
        metrics = EpochMetrics(epoch, train_loss, train_accuracy, val_loss, val_accuracy, self.lr, seconds,
                               seen / seconds)
        self.history.append(metrics)
        if self.scheduler is not None and not self.step_per_batch:
            plateau = cfg.scheduler == "plateau"
            self.scheduler.step(getattr(metrics, cfg.monitor)) if plateau else self.scheduler.step()
        score = smoothed(self.history, cfg.monitor, cfg.monitor_window)
        if is_better(cfg.monitor, score, self.best_score):
            self.best_epoch, self.best_score, self.bad_epochs = epoch, score, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
        if self.checkpoints:  # Checkpoints.writer: only one rank writes
            self.checkpoints.save(self.state())
        with processes.signals_deferred():  # an epoch reaches every callback or none (tracking and pruner agree)
            for callback in self.callbacks:
                callback.on_epoch_end(metrics)
        self._finish_if_done()

    def state(self) -> dict:
        """Everything an exact resume after the last epoch needs (what `Checkpoints` saves and `start` loads)."""
        return {
            "epoch": len(self.history), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(), "history": [asdict(m) for m in self.history],
            "best_epoch": self.best_epoch, "best_score": self.best_score, "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "batches": self.train_batches.state_dict()},
        }

    def _finish_if_done(self) -> None:
        """All epochs run, or early stopping's patience used up: the run's result, and its callbacks told."""
        cfg = self.cfg
        stopped_early = bool(cfg.patience and self.bad_epochs >= cfg.patience and len(self.history) < cfg.epochs)
        if len(self.history) < cfg.epochs and not stopped_early:
            return
        self.result = FitResult(self.history, self.best_epoch, self.best_score, self.best_state, stopped_early,
                                time.perf_counter() - self.started)
        with processes.signals_deferred():
            for callback in self.callbacks:
                callback.on_fit_end(self.result)


def smoothed(history: list[EpochMetrics], monitor: str, window: int) -> float:
    """What a run is judged on after its last epoch: the mean of `monitor` over its last `window` epochs. The epoch
    that ships ends the best such window, so one lucky validation pass on a small split does not choose it."""
    return statistics.fmean(getattr(m, monitor) for m in history[-window:])


# ---------------------------------------------------------------- the loop

def fit(model: nn.Module, train_batches, val_batches, cfg: TrainConfig, device: torch.device,
        callbacks: Sequence[Callback] = (), checkpoints: Checkpoints | None = None,
        world: distributed.World = distributed.World()) -> FitResult:
    """Train `model` for `cfg.epochs` (or until early stopping); returns history and best weights.

    `train_batches`/`val_batches` yield (inputs, labels) already on `device`; the
    train batches also expose `state_dict()`/`load_state_dict()` for their RNG.
    An exception from a callback (or a diverged loss) ends training and is raised.
    """
    return fit_run(Run(model, cfg, train_batches, val_batches, callbacks, checkpoints), device, world)


def fit_run(run: Run, device: torch.device, world: distributed.World = distributed.World()) -> FitResult:
    """`fit` for a run already put together (e.g. one of a config's seed replicates)."""
    for _ in epochs(run, device, world):
        pass
    return run.result


def epochs(run: Run, device: torch.device, world: distributed.World = distributed.World()) -> Iterator[EpochMetrics]:
    """The loop itself, an epoch at a time: starts `run`, then trains and evaluates one epoch per `next`, yielding
    its metrics, until the run has its result. A caller that drives epochs itself (Ray Tune's `step`) pulls them."""
    model, cfg = run.model, run.cfg
    run.start(device, world)
    trained = distributed.wrap(model, device, world)  # DistributedDataParallel when there are several ranks
    forward = torch.compile(trained) if cfg.compile else trained
    judged = model if world.distributed else forward  # every rank evaluates the whole val split alike
    dtype = run.dtype(device)
    while run.result is None:
        tick = time.perf_counter()
        run.begin_epoch()
        train = train_one_epoch(forward, run, dtype, device, world)
        val = evaluate(judged, run.val_batches, dtype, device)
        run.end_epoch(train, val, time.perf_counter() - tick)
        yield run.history[-1]


def train_one_epoch(model: nn.Module, run: Run, dtype: torch.dtype | None, device: torch.device,
                    world: distributed.World = distributed.World()) -> tuple[float, float, int]:
    """One pass over the run's training batches: (mean loss, accuracy, samples), over all ranks when there are
    several. `model` computes the run's model (wrapped for DDP or compiled as configured)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    for inputs, labels in progress(run.train_batches, f"epoch {len(run.history) + 1}/{run.cfg.epochs}"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs)
            loss = run.criterion(logits, labels)
            summed = loss.detach().float() * len(labels)
            if world.distributed:
                # Each rank holds a slice of the global batch, and DDP averages gradients over the ranks: scaled by
                # ranks / samples in the global batch, the average is the global batch's mean-loss gradient.
                summed = loss.detach().float()
                count = torch.tensor(float(len(labels)), device=device)
                loss = loss * world.size / distributed.all_reduce_sum(count, world)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.step()
        # Accumulate on the device: a .item() here would stall the GPU every step.
        loss_sum += summed
        hits += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    loss, hit, count = distributed.all_reduce_sum(torch.stack([loss_sum, hits.float(), seen.float()]), world).tolist()
    return loss / max(count, 1), hit / max(count, 1), int(count)


@torch.inference_mode()
def evaluate(model: nn.Module, batches, dtype: torch.dtype | None, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over `batches`."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for inputs, labels in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        hits += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    return loss_sum.item() / max(seen, 1), hits.item() / max(seen, 1)


@torch.inference_mode()
def predict(model: nn.Module, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, class probabilities) for every sample, on the CPU."""
    model.eval().to(device)
    labels, probs = [], []
    for inputs, batch_labels in batches:
        probs.append(model(inputs).float().softmax(dim=1))
        labels.append(batch_labels)
    return torch.cat(labels).cpu(), torch.cat(probs).cpu()


def progress(batches, description: str, total: int | None = None):
    """A progress bar on an interactive terminal; nothing extra in CI logs."""
    if not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=description, total=total or len(batches), leave=False, dynamic_ncols=True)
