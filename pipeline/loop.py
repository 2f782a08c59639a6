"""The one training loop: plain training and every Optuna trial go through `fit`.

It knows nothing of MLflow or Optuna. It reports through `Callback` hooks, so
tracking and pruning plug in from outside. Per step it never syncs with the
host: losses and hits accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import functools
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed, files, processes
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

def fit(model: nn.Module, train_batches, val_batches, cfg: TrainConfig, device: torch.device,
        callbacks: Sequence[Callback] = (), checkpoints: Checkpoints | None = None,
        world: distributed.World = distributed.World()) -> FitResult:
    """Train `model` for `cfg.epochs` (or until early stopping); returns history and best weights.

    `train_batches`/`val_batches` yield (inputs, labels) already on `device`; the
    train batches also expose `state_dict()`/`load_state_dict()` for their RNG.
    """
    model.to(device)
    if uses_channels_last(cfg, model):
        model.to(memory_format=torch.channels_last)
    set_epoch = getattr(model, "set_epoch", None)  # the model's own schedule (a pretrained backbone's freezing)
    if set_epoch:
        set_epoch(1)  # before DDP wraps it: DDP syncs the parameters that need gradients at that moment
    trained = distributed.wrap(model, device, world)  # DistributedDataParallel when there are several ranks
    forward = torch.compile(trained) if cfg.compile else trained
    judged = model if world.distributed else forward  # every rank evaluates the whole val split alike
    dtype = autocast_dtype(cfg.precision, device, has_convolutions(model))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # several ranks sum their slice's losses (see train_one_epoch); one process averages as usual
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                    reduction="sum" if world.distributed else "mean")
    optimizer = build_optimizer(parameter_groups(model, cfg), cfg)
    scheduler, step_per_batch = build_scheduler(optimizer, cfg, len(train_batches))

    history: list[EpochMetrics] = []
    best_epoch, best_score, best_state, bad_epochs = 0, worst(cfg.monitor), {}, 0
    resumed = checkpoints.load() if (checkpoints and cfg.resume) else None
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        history = [EpochMetrics(**row) for row in resumed["history"]]
        best_epoch, best_score, best_state = resumed["best_epoch"], resumed["best_score"], resumed["best_state"]
        bad_epochs = resumed["bad_epochs"]
        _restore_rng(resumed["rng"], train_batches)
        print(f"resuming from {checkpoints.path} after epoch {len(history)}", file=sys.stderr)

    for callback in callbacks:
        callback.on_fit_start(model, list(history))
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if cfg.patience and bad_epochs >= cfg.patience:
            stopped_early = True
            break
        tick = time.perf_counter()
        if set_epoch:
            set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy, seen = train_one_epoch(
            forward, criterion, optimizer, scaler, scheduler if step_per_batch else None,
            train_batches, cfg, dtype, device, epoch, world)
        val_loss, val_accuracy = evaluate(judged, val_batches, dtype, device)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} (lr={lr:g})")
        seconds = time.perf_counter() - tick
        metrics = EpochMetrics(epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds, seen / seconds)
        history.append(metrics)
        score = getattr(metrics, cfg.monitor)
        if scheduler is not None and not step_per_batch:
            scheduler.step(score) if cfg.scheduler == "plateau" else scheduler.step()

        improved = is_better(cfg.monitor, score, best_score)
        if improved:
            best_epoch, best_score, bad_epochs = epoch, score, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        if checkpoints:  # Checkpoints.writer: only one rank writes
            checkpoints.save({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "scaler": scaler.state_dict(), "history": [asdict(m) for m in history],
                "best_epoch": best_epoch, "best_score": best_score, "best_state": best_state,
                "bad_epochs": bad_epochs, "rng": _capture_rng(train_batches),
            })
        for callback in callbacks:
            callback.on_epoch_end(metrics)

    result = FitResult(history, best_epoch, best_score, best_state, stopped_early, time.perf_counter() - started)
    for callback in callbacks:
        callback.on_fit_end(result)
    return result


def train_one_epoch(model, criterion, optimizer, scaler, batch_scheduler, batches, cfg: TrainConfig,
                    dtype, device: torch.device, epoch: int, world: distributed.World = distributed.World()
                    ) -> tuple[float, float, int]:
    """One pass over `batches`; returns (mean loss, accuracy, samples), over all ranks when there are several."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    for inputs, labels in _progress(batches, f"epoch {epoch}/{cfg.epochs}"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs)
            loss = criterion(logits, labels)
            summed = loss.detach().float() * len(labels)
            if world.distributed:
                # Each rank holds a slice of the global batch, and DDP averages gradients over the ranks: scaled by
                # ranks / samples in the global batch, the average is the global batch's mean-loss gradient.
                summed = loss.detach().float()
                count = torch.tensor(float(len(labels)), device=device)
                loss = loss * world.size / distributed.all_reduce_sum(count, world)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if batch_scheduler is not None:
            batch_scheduler.step()
        # Accumulate on the device: a .item() here would stall the GPU every step.
        loss_sum += summed
        hits += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, hits.float(), seen.float()]), world).tolist()
    loss_total, hit_total, count = totals[0], totals[1], int(totals[2])
    return loss_total / max(count, 1), hit_total / max(count, 1), count


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
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
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


def _progress(batches, description: str):
    """A progress bar on an interactive terminal; nothing extra in CI logs."""
    if not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=description, leave=False, dynamic_ncols=True)


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
