"""The one training loop: plain training and every Optuna trial go through `fit`.

It knows nothing of MLflow or Optuna. It reports through `Callback` hooks, so
tracking and pruning plug in from outside. Per step it never syncs with the
host: losses and hits accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    samples_per_s: float


class Callback:
    """Hooks the loop calls. Raising from `on_epoch_end` stops training (e.g. a pruned trial)."""

    def on_fit_start(self, model: nn.Module, start_epoch: int) -> None:
        pass

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

def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. `auto`: bf16 on CUDA when supported, else fp16 (with a grad scaler); off on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                   total_steps=cfg.epochs * steps_per_epoch), True
    return None, False


# ---------------------------------------------------------------- checkpoints

class Checkpoints:
    """`last.pt` (everything needed to resume exactly) and `best.pt` in one folder.

    Files are written to a temporary name and renamed, so an interrupted save
    never leaves a torn checkpoint. A checkpoint is only resumed when its config
    fingerprint matches: a changed config starts fresh instead of mixing runs.
    """

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best(self) -> Path:
        return self.directory / "best.pt"

    def save(self, state: dict, is_best: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {**state, "fingerprint": self.fingerprint}
        if is_best:
            best = {key: value for key, value in state.items() if key != "best_state"}
            _atomic_save(best, self.best)
        _atomic_save(state, self.last)

    def load_resumable(self) -> dict | None:
        if not self.last.exists():
            return None
        state = torch.load(self.last, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(f"ignoring {self.last}: it belongs to another config", file=sys.stderr)
            return None
        return state

    def clear_resume_point(self) -> None:
        self.last.unlink(missing_ok=True)


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the loop

def fit(model: nn.Module, train_batches, val_batches, cfg: TrainConfig, device: torch.device,
        callbacks: Sequence[Callback] = (), checkpoints: Checkpoints | None = None) -> FitResult:
    """Train `model` for `cfg.epochs` (or until early stopping); returns history and best weights.

    `train_batches`/`val_batches` yield (inputs, labels) already on `device`; the
    train batches also expose `state_dict()`/`load_state_dict()` for their RNG.
    """
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler, step_per_batch = build_scheduler(optimizer, cfg, len(train_batches))
    higher_is_better = cfg.monitor == "val_accuracy"

    history: list[EpochMetrics] = []
    best_epoch, best_score, best_state, bad_epochs = 0, -math.inf if higher_is_better else math.inf, {}, 0
    resumed = checkpoints.load_resumable() if (checkpoints and cfg.resume) else None
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
        print(f"resuming from {checkpoints.last} after epoch {len(history)}", file=sys.stderr)

    for callback in callbacks:
        callback.on_fit_start(model, len(history) + 1)
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if cfg.patience and bad_epochs >= cfg.patience:
            stopped_early = True
            break
        tick = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy, seen = _train_one_epoch(
            forward, criterion, optimizer, scaler, scheduler if step_per_batch else None,
            train_batches, cfg, dtype, device, epoch)
        val_loss, val_accuracy = evaluate(forward, val_batches, dtype, device)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(f"training loss became {train_loss} in epoch {epoch} (lr={lr:g})")
        score = val_accuracy if cfg.monitor == "val_accuracy" else val_loss
        if scheduler is not None and not step_per_batch:
            scheduler.step(score) if cfg.scheduler == "plateau" else scheduler.step()
        seconds = time.perf_counter() - tick
        metrics = EpochMetrics(epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds, seen / seconds)
        history.append(metrics)

        improved = score > best_score if higher_is_better else score < best_score
        if improved:
            best_epoch, best_score, bad_epochs = epoch, score, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        if checkpoints:
            checkpoints.save({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "scaler": scaler.state_dict(), "history": [asdict(m) for m in history],
                "best_epoch": best_epoch, "best_score": best_score, "best_state": best_state,
                "bad_epochs": bad_epochs, "rng": _capture_rng(train_batches),
            }, is_best=improved)
        for callback in callbacks:
            callback.on_epoch_end(metrics)

    result = FitResult(history, best_epoch, best_score, best_state, stopped_early, time.perf_counter() - started)
    for callback in callbacks:
        callback.on_fit_end(result)
    return result


def _train_one_epoch(model, criterion, optimizer, scaler, batch_scheduler, batches, cfg: TrainConfig,
                     dtype, device: torch.device, epoch: int) -> tuple[float, float, int]:
    model.train()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for inputs, labels in _progress(batches, f"epoch {epoch}/{cfg.epochs}"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(inputs)
            loss = criterion(logits, labels)
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
        loss_sum += loss.detach().float() * len(labels)
        hits += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    return loss_sum.item() / max(seen, 1), hits.item() / max(seen, 1), seen


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
              f"lr {m.lr:.2e} {m.seconds:.2f}s", flush=True)
