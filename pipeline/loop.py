"""The one training loop: plain training, every Optuna trial and every population of trials go through it.

`fit` trains one run; `fit_together` trains several at once (one forward pass
for all, each with its own optimizer and metrics); `fit` is the case of one.
It knows nothing of MLflow or Optuna. It reports through `Callback` hooks, so
tracking and pruning plug in from outside. Per step it never syncs with the
host: losses and hits accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import data, distributed, files, processes, stacking
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


# ---------------------------------------------------------------- environment

def thread_count(requested: int | None, sharing: int, available: int, env: str | None) -> int:
    """CPU threads for one of `sharing` processes training at once: `requested`, else an equal share of the
    `available` cores (at most OMP_NUM_THREADS, `env`, when set). Each process taking every core oversubscribes
    them: a CNN epoch measured 10-50x slower on a loaded 2-core machine than with one thread."""
    if requested:
        return requested
    share = max(1, available // max(1, sharing))
    return min(share, int(env)) if env and env.isdigit() and int(env) > 0 else share


def set_threads(requested: int | None, sharing: int = 1) -> int:
    """Pin torch's CPU threads for this process (see `thread_count`); returns the number."""
    threads = thread_count(requested, sharing, processes.available_cores(), os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """train.device as a torch device; asking for a device this machine lacks is a user error."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name}, but this machine has no CUDA device; use auto or cpu")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps, but MPS (Apple GPU) is not available here; use auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device, convolutional: bool = True) -> torch.dtype | None:
    """None means full fp32. `auto`: bf16 on CUDA when supported, else fp16 (with a grad scaler); on a CPU with
    native bf16 instructions, bf16 for models with convolutions (measured here: 1.6-2.7x faster CNN steps, the same
    test accuracy on digits, reruns still identical) and fp32 for the others (bf16 made MLP steps 20-40% slower);
    fp32 on other CPUs and MPS."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and convolutional and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX-512 BF16 or AMX compute bf16 in hardware; elsewhere bf16 autocast only emulates it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def uses_channels_last(cfg: TrainConfig, model: nn.Module) -> bool:
    """`auto`: channels_last for models with convolutions (measured here: 1.3-1.9x faster CNN steps on CPU)."""
    if cfg.channels_last == "auto":
        return has_convolutions(model)
    return bool(cfg.channels_last)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for torch
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic and torch.cuda.is_available():
        # CPU kernels are already deterministic; the switch (and its 2 s of imports) matters for CUDA.
        # cuBLAS needs this before its first use to pick reproducible kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> Iterable[nn.Parameter] | list[dict]:
    """All parameters at train.lr, or a pretrained backbone (a model's `backbone`) at train.backbone_lr.

    A frozen backbone stays in the optimizer: with no gradients it is skipped, and unfreezing needs no new one.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or cfg.backbone_lr is None:
        return model.parameters()
    inside = {id(parameter) for parameter in backbone.parameters()}
    # the head first: the lr the loop reports (param_groups[0]) is train.lr's schedule
    return [{"params": [parameter for parameter in model.parameters() if id(parameter) not in inside]},
            {"params": list(backbone.parameters()), "lr": cfg.backbone_lr}]


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels where PyTorch has them (one kernel per step instead of a few per
    parameter: measured here 10-20% faster small-model steps on CPU, deterministic)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Returns (scheduler or None, steps per batch?)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), False
    if cfg.scheduler == "plateau":
        mode = "max" if cfg.monitor == "val_accuracy" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma,
                                                          patience=max(1, cfg.patience // 2)), False
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), False
    if cfg.scheduler == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]  # each group peaks at its own lr
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=cfg.epochs * steps_per_epoch
                                                   ), True
    return None, False


# ---------------------------------------------------------------- checkpoints

class Checkpoints:
    """The resume point of one training run: `<directory>/<key>.pt`, rewritten after every epoch.

    `key` names everything the result depends on (the caller builds it from the
    config, the data and the code), so a resume point is only ever picked up by
    the same run, and runs with other keys never touch it. The caller removes
    it once the run's outputs are written: a finished run is never resumed.
    `meta` travels with the state (e.g. the tracking run to continue).
    """

    def __init__(self, directory: Path, key: str, meta: dict | None = None, writer: bool = True):
        self.directory, self.key, self.meta = Path(directory), key, dict(meta or {})
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
            others = sorted(self.directory.glob("*.pt")) if self.directory.is_dir() else []
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


# ---------------------------------------------------------------- the loop

@dataclass(eq=False)
class Member:
    """One training run: what `fit` trains alone and `fit_together` trains with others.

    The caller gives its model, config, batches, callbacks and resume point;
    `key` is the caller's own handle (e.g. an Optuna trial). The loop fills in
    `result` when the run ends normally, or `error` when an exception ended it
    (a callback's, e.g. a pruned trial, or a diverged loss).
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
    # the run's training state, set up by `start`
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
    started: float = field(init=False, default=0.0, repr=False)

    @property
    def ended(self) -> bool:
        return self.result is not None or self.error is not None


def fit(model: nn.Module, train_batches, val_batches, cfg: TrainConfig, device: torch.device,
        callbacks: Sequence[Callback] = (), checkpoints: Checkpoints | None = None,
        world: distributed.World = distributed.World()) -> FitResult:
    """Train `model` for `cfg.epochs` (or until early stopping); returns history and best weights.

    `train_batches`/`val_batches` yield (inputs, labels) already on `device`; the
    train batches also expose `state_dict()`/`load_state_dict()` for their RNG.
    An exception from a callback (or a diverged loss) ends training and is raised.
    """
    member = Member(model, cfg, train_batches, val_batches, callbacks, checkpoints)
    fit_together([member], device, world=world)
    if member.error is not None:
        raise member.error
    return member.result


def fit_together(members: list[Member], device: torch.device,
                 next_members: Callable[[list[Member], int], list[Member]] | None = None,
                 world: distributed.World = distributed.World()) -> None:
    """Train several runs at once, each as `fit` would train it alone.

    Runs whose models have the same `stacking.signature` (the same layers and
    widths), batches per epoch and precision form a group that one forward pass
    computes; each run keeps its own optimizer, schedule, callbacks, early
    stopping and resume point, and its per-epoch metrics are its own. Groups (and
    runs that cannot be fused) take turns, an epoch each. A run leaves when it
    ends (see `Member`); after every round `next_members(ended, still_training)`
    is told which runs just ended and may return new runs, which start at their
    first epoch while the others go on (continuous batching). With several ranks
    (DistributedDataParallel) there is one run.
    """
    running: list[Member] = []
    ended: list[Member] = []
    joining = list(members)
    forwards: dict[tuple[int, ...], tuple[nn.Module, nn.Module]] = {}
    while True:
        for member in joining:
            start(member, device, world)
            (ended if member.ended else running).append(member)  # a resumed run may be over already
        if world.distributed and len(running) > 1:
            raise ValueError("several ranks (DistributedDataParallel) train one run at a time")
        joining = next_members(ended, len(running)) if next_members else []
        ended = []
        if joining:
            continue
        if not running:
            return
        groups = {tuple(id(member) for member in group): group for group in _groups(running, device)}
        forwards = {key: forwards.get(key) or _forwards(group, device, world) for key, group in groups.items()}
        for key, group in groups.items():
            _train_epoch_together(group, *forwards[key], device, world)
        ended = [member for member in running if member.ended]
        running = [member for member in running if not member.ended]


def _groups(running: list[Member], device: torch.device) -> list[list[Member]]:
    """The runs one forward pass computes together: same model signature, batch size and batches per epoch (63 and
    64 give digits' 1221 images 20 batches each), precision and memory format. Runs that cannot be fused (other
    models, fp16's per-run loss scale, torch.compile) are alone."""
    groups: dict[Any, list[Member]] = {}
    for member in running:
        signature, dtype = stacking.signature(member.model), _dtype(member, device)
        alone = signature is None or dtype == torch.float16 or member.cfg.compile
        key = id(member) if alone else (signature, member.cfg.batch_size, len(member.train_batches), dtype,
                                        uses_channels_last(member.cfg, member.model))
        groups.setdefault(key, []).append(member)
    return list(groups.values())


def _forwards(group: list[Member], device: torch.device, world: distributed.World) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluating forward) of a group: one run's model (wrapped for DistributedDataParallel and
    compiled as configured), or a `stacking.Stack` of several."""
    if len(group) > 1:
        stack = stacking.Stack([member.model for member in group])
        return stack, stack
    model = group[0].model
    trained = distributed.wrap(model, device, world)  # DistributedDataParallel when there are several ranks
    forward = torch.compile(trained) if group[0].cfg.compile else trained
    return forward, model if world.distributed else forward  # every rank evaluates the whole val split alike


def _dtype(member: Member, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(member.cfg.precision, device, has_convolutions(member.model))


def start(member: Member, device: torch.device, world: distributed.World = distributed.World()) -> None:
    """Sets up one run: its model on the device, optimizer, schedule and loss, its resume point if any, and its
    callbacks' on_fit_start (`fit_together` calls it for every run that joins)."""
    model, cfg = member.model, member.cfg
    model.to(device)
    if uses_channels_last(cfg, model):
        model.to(memory_format=torch.channels_last)
    set_epoch = getattr(model, "set_epoch", None)  # the model's own schedule (a pretrained backbone's freezing)
    if set_epoch:
        set_epoch(1)  # before DDP wraps it: DDP syncs the parameters that need gradients at that moment
    member.scaler = torch.amp.GradScaler(device.type, enabled=_dtype(member, device) == torch.float16)
    # several ranks sum their slice's losses (see train_one_epoch); one process averages as usual
    member.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                           reduction="sum" if world.distributed else "mean")
    member.optimizer = build_optimizer(parameter_groups(model, cfg), cfg)
    member.scheduler, member.step_per_batch = build_scheduler(member.optimizer, cfg, len(member.train_batches))
    member.best_score = worst(cfg.monitor)
    checkpoints = member.checkpoints
    resumed = checkpoints.load() if (checkpoints and cfg.resume) else None
    if resumed:
        model.load_state_dict(resumed["model"])
        member.optimizer.load_state_dict(resumed["optimizer"])
        if member.scheduler is not None:
            member.scheduler.load_state_dict(resumed["scheduler"])
        member.scaler.load_state_dict(resumed["scaler"])
        member.history = [EpochMetrics(**row) for row in resumed["history"]]
        member.best_epoch, member.best_score = resumed["best_epoch"], resumed["best_score"]
        member.best_state, member.bad_epochs = resumed["best_state"], resumed["bad_epochs"]
        _restore_rng(resumed["rng"], member.train_batches)
        print(f"resuming from {checkpoints.path} after epoch {len(member.history)}", file=sys.stderr)
    for callback in member.callbacks:
        callback.on_fit_start(model, list(member.history))
    member.started = time.perf_counter()
    _end_if_done(member)


def _end_if_done(member: Member) -> None:
    """All epochs run, or early stopping's patience used up: the run's result."""
    cfg = member.cfg
    stopped_early = bool(cfg.patience and member.bad_epochs >= cfg.patience and len(member.history) < cfg.epochs)
    if len(member.history) < cfg.epochs and not stopped_early:
        return
    member.result = FitResult(member.history, member.best_epoch, member.best_score, member.best_state,
                              stopped_early, time.perf_counter() - member.started)
    try:
        with _whole():
            for callback in member.callbacks:
                callback.on_fit_end(member.result)
    except Exception as err:  # noqa: BLE001 - the run's own failure: the others go on; `fit` raises it
        member.error = err


def _train_epoch_together(members: list[Member], forward: nn.Module, judged: nn.Module, device: torch.device,
                          world: distributed.World) -> None:
    """One epoch of every member, then each member's end of epoch: metrics, schedule, best weights, resume point,
    callbacks. A member whose loss diverged or whose callback raised ends with that error."""
    dtype = _dtype(members[0], device)
    tick = time.perf_counter()
    lrs = []
    for member in members:
        epoch = len(member.history) + 1
        if set_epoch := getattr(member.model, "set_epoch", None):
            set_epoch(epoch)
        lrs.append(member.optimizer.param_groups[0]["lr"])
    trained = train_one_epoch(forward, members, dtype, device, world)
    # runs fused together share their val batches: same data, and no pretrained weights' own normalisation
    validated = evaluate(judged, members[0].val_batches, dtype, device, len(members))
    seconds = time.perf_counter() - tick
    for member, lr, (train_loss, train_accuracy, seen), (val_loss, val_accuracy) in zip(members, lrs, trained,
                                                                                       validated):
        epoch = len(member.history) + 1
        if not math.isfinite(train_loss):
            member.error = NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} (lr={lr:g})")
            continue
        metrics = EpochMetrics(epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds,
                               seen / seconds)
        try:
            _end_epoch(member, metrics)
        except Exception as err:  # noqa: BLE001 - the run's own failure: the others go on; `fit` raises it
            member.error = err
            continue
        _end_if_done(member)


def _end_epoch(member: Member, metrics: EpochMetrics) -> None:
    cfg, epoch = member.cfg, metrics.epoch
    member.history.append(metrics)
    score = getattr(metrics, cfg.monitor)
    if member.scheduler is not None and not member.step_per_batch:
        member.scheduler.step(score) if cfg.scheduler == "plateau" else member.scheduler.step()
    if is_better(cfg.monitor, score, member.best_score):
        member.best_epoch, member.best_score, member.bad_epochs = epoch, score, 0
        member.best_state = {k: v.detach().to("cpu", copy=True) for k, v in member.model.state_dict().items()}
    else:
        member.bad_epochs += 1
    if member.checkpoints:  # Checkpoints.writer: only one rank writes
        member.checkpoints.save({
            "epoch": epoch, "model": member.model.state_dict(), "optimizer": member.optimizer.state_dict(),
            "scheduler": member.scheduler.state_dict() if member.scheduler is not None else {},
            "scaler": member.scaler.state_dict(), "history": [asdict(m) for m in member.history],
            "best_epoch": member.best_epoch, "best_score": member.best_score, "best_state": member.best_state,
            "bad_epochs": member.bad_epochs, "rng": _capture_rng(member.train_batches),
        })
    with _whole():
        for callback in member.callbacks:
            callback.on_epoch_end(metrics)


@contextlib.contextmanager
def _whole():
    """Ctrl-C or SIGTERM arriving inside the block takes effect as it ends, so an epoch reaches every callback of
    a run or none: interrupted in between, tracking would keep an epoch the pruner (the Optuna trial) never saw.
    Only the main thread receives signals; elsewhere the block runs as it is."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # None: a handler not set from Python, which could not be put back
        return
    arrived: list[tuple[int, Any]] = []
    for number in handlers:
        signal.signal(number, lambda *received: arrived.append(received))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number, frame in arrived[:1]:  # as it would have been received: the handler raises, or the default
            if callable(handlers[number]):
                handlers[number](number, frame)
            elif handlers[number] == signal.SIG_DFL:
                signal.raise_signal(number)


def train_one_epoch(forward: nn.Module, members: list[Member], dtype, device: torch.device,
                    world: distributed.World = distributed.World()) -> list[tuple[float, float, int]]:
    """One pass over every member's batches; per member (mean loss, accuracy, samples), over all ranks when there
    are several. One member: `forward` is its model. Several: a `stacking.Stack` of their models, fed each
    member's own batch (their epochs may differ: a run that joined later sees its own first epoch)."""
    forward.train()
    k = len(members)
    loss_sum = torch.zeros(k, device=device)
    hits = torch.zeros(k, device=device, dtype=torch.long)
    seen = torch.zeros(k, device=device, dtype=torch.long)
    first = members[0]
    smoothing = torch.tensor([[member.cfg.label_smoothing] for member in members], device=device) if k > 1 else None
    description = f"epoch {len(first.history) + 1}/{first.cfg.epochs}" + (f" ({k} runs)" if k > 1 else "")
    # one run: its own batches; several: each run's batch, stacked [K, B, ...]
    steps = first.train_batches if k == 1 else data.together([member.train_batches for member in members])
    for inputs, labels in _progress(steps, description, len(first.train_batches)):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(inputs)
            # one run: its own criterion, as always; several: each run's loss, [K], in one go
            loss = first.criterion(logits, labels) if k == 1 else _losses(logits, labels, smoothing)
            summed = loss.detach().float() * labels.shape[-1]
            if world.distributed:
                # Each rank holds a slice of the global batch, and DDP averages gradients over the ranks: scaled by
                # ranks / samples in the global batch, the average is the global batch's mean-loss gradient.
                summed = loss.detach().float()
                count = torch.tensor(float(len(labels)), device=device)
                loss = loss * world.size / distributed.all_reduce_sum(count, world)
        for member in members:
            member.optimizer.zero_grad(set_to_none=True)
        # runs' losses are independent: the sum's gradient is each run's own (fp16 runs train alone)
        first.scaler.scale(loss if k == 1 else loss.sum()).backward()
        for member in members:
            if member.cfg.grad_clip:
                member.scaler.unscale_(member.optimizer)
                nn.utils.clip_grad_norm_(member.model.parameters(), member.cfg.grad_clip)
            member.scaler.step(member.optimizer)
            member.scaler.update()
            if member.step_per_batch:
                member.scheduler.step()
        # Accumulate on the device: a .item() here would stall the GPU every step.
        loss_sum += summed
        hits += (logits.argmax(dim=-1) == labels).sum(dim=-1)
        seen += labels.shape[-1]
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, hits.float(), seen.float()]), world).tolist()
    return [(loss / max(count, 1), hit / max(count, 1), int(count)) for loss, hit, count in zip(*totals)]


def _losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy with its own label smoothing, in one go: [K, B, classes] -> [K]. The same
    formula as nn.CrossEntropyLoss(label_smoothing=e): (1 - e) * nll + e * mean over classes of -log p."""
    log_p = logits.float().log_softmax(dim=2)
    nll = -log_p.gather(2, labels.unsqueeze(2)).squeeze(2)
    return ((1 - smoothing) * nll - smoothing * log_p.mean(dim=2)).mean(dim=1)


@torch.inference_mode()
def evaluate(model: nn.Module, batches, dtype: torch.dtype | None, device: torch.device, k: int = 1
             ) -> list[tuple[float, float]]:
    """Per member, mean cross-entropy (no label smoothing) and accuracy over `batches`; `model` is one model
    (k == 1) or a `stacking.Stack` of k, which sees the same batches."""
    model.eval()
    loss_sum = torch.zeros(k, device=device)
    hits = torch.zeros(k, device=device, dtype=torch.long)
    seen = 0
    for inputs, labels in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs.expand(k, *inputs.shape)) if k > 1 else model(inputs)[None]
        for i in range(k):
            loss_sum[i] += nn.functional.cross_entropy(logits[i].float(), labels, reduction="sum")
        hits += (logits.argmax(dim=2) == labels).sum(dim=1)
        seen += len(labels)
    return [(loss / max(seen, 1), hit / max(seen, 1)) for loss, hit in zip(loss_sum.tolist(), hits.tolist())]


@torch.inference_mode()
def predict(model: nn.Module, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, class probabilities) for every sample, on the CPU."""
    model.eval().to(device)
    labels, probs = [], []
    for inputs, batch_labels in batches:
        probs.append(model(inputs).float().softmax(dim=1))
        labels.append(batch_labels)
    return torch.cat(labels).cpu(), torch.cat(probs).cpu()


def _progress(batches, description: str, total: int):
    """A progress bar on an interactive terminal; nothing extra in CI logs."""
    if not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=description, total=total, leave=False, dynamic_ncols=True)


def _capture_rng(train_batches) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "batches": train_batches.state_dict()}


def _restore_rng(rng: dict, train_batches) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    train_batches.load_state_dict(rng["batches"])


class ConsoleLog(Callback):
    """One plain line per epoch: readable in CI logs and `dvc repro` output."""

    def __init__(self, name: str, epochs: int):
        self.name, self.epochs = name, epochs

    def on_epoch_end(self, m: EpochMetrics) -> None:
        print(f"[{self.name}] epoch {m.epoch:>3}/{self.epochs} train_loss {m.train_loss:.4f} "
              f"train_acc {m.train_accuracy:.4f} val_loss {m.val_loss:.4f} val_acc {m.val_accuracy:.4f} "
              f"lr {m.lr:.2e} {m.epoch_seconds:.2f}s", flush=True)
