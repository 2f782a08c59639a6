"""Several runs trained at once, each as `loop.fit` trains it alone: the trials of a search, a config's seed replicates.

Each run keeps its own `loop.Run` (optimizer, schedule, callbacks, early
stopping, resume point, per-epoch metrics); runs with equal
`fusion.fusion_key` form a group whose steps one forward pass (`stacking.Stack`)
computes. Groups, and runs that are never fused, take turns, an epoch each.
A run leaves when it ends; after every round the caller is told which runs
ended and may hand in new ones, which start at their first epoch while the
others train on (continuous batching). A run's own exception (a pruned trial,
a diverged loss) ends that run only; Ctrl-C ends them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from pipeline import batching, loop, processes
from pipeline.loop import Run
from pipeline.population import fusion
from pipeline.population.stacking import Stack

NextRuns = Callable[[list[Run], int], list[Run]]


def fit_together(runs: list[Run], device: torch.device, next_runs: NextRuns | None = None) -> None:
    """Train `runs` until each has its `result` (or `error`). `next_runs(ended, still_training)` is called after
    every round with the runs that just ended, and returns runs to start."""
    running: list[Run] = []
    ended: list[Run] = []
    joining = list(runs)
    forwards: dict[tuple[int, ...], nn.Module] = {}
    while True:
        for run in joining:
            run.start(device)
            (ended if run.ended else running).append(run)  # a resumed run may be over already
        joining = next_runs(ended, len(running)) if next_runs else []
        ended = []
        if joining:
            continue
        if not running:
            return
        groups = {tuple(id(run) for run in group): group for group in fusion.groups(running, device)}
        forwards = {key: forwards.get(key) or _forward(group) for key, group in groups.items()}
        for key, group in groups.items():
            _epoch(group, forwards[key], device)
        ended = [run for run in running if run.ended]
        running = [run for run in running if not run.ended]


def _forward(group: list[Run]) -> nn.Module:
    """What computes a group's steps: one run's model (compiled as configured), or a Stack of several."""
    if len(group) > 1:
        return Stack([run.model for run in group])
    return torch.compile(group[0].model) if group[0].cfg.compile else group[0].model


def _epoch(group: list[Run], forward: nn.Module, device: torch.device) -> None:
    """One epoch of every run of a group, then each run's end of epoch; a run whose end of epoch raises (its loss
    diverged, its callback pruned it) ends with that error while the others go on."""
    dtype = group[0].dtype(device)  # equal within a group (`fusion_key`)
    tick = time.perf_counter()
    for run in group:
        run.begin_epoch()
    trained = train_one_epoch(forward, group, dtype, device)
    validated = evaluate(forward, group, dtype, device)
    seconds = time.perf_counter() - tick
    with processes.signals_deferred():  # Ctrl-C or SIGTERM: every run of the group keeps this epoch, or none does
        for run, train, val in zip(group, trained, validated):
            try:
                run.end_epoch(train, val, seconds)
            except Exception as err:  # noqa: BLE001 - the run's own failure: the others go on
                run.error = err


def train_one_epoch(forward: nn.Module, group: list[Run], dtype: torch.dtype | None, device: torch.device
                    ) -> list[tuple[float, float, int]]:
    """One pass over every run's batches; per run (mean loss, accuracy, samples). One run: the loop's own
    `train_one_epoch`. Several: `forward` (a Stack) takes each run's own batch, stacked [K, B, ...] (their epochs
    may differ: a run that joined later sees its own first epoch), and returns each run's logits."""
    if len(group) == 1:
        return [loop.train_one_epoch(forward, group[0], dtype, device)]
    forward.train()
    k, first = len(group), group[0]
    loss_sum = torch.zeros(k, device=device)
    hits = torch.zeros(k, device=device, dtype=torch.long)
    seen = torch.zeros(k, device=device, dtype=torch.long)
    smoothing = torch.tensor([[run.cfg.label_smoothing] for run in group], device=device)
    steps = batching.together([run.train_batches for run in group])
    description = f"epoch {len(first.history) + 1}/{first.cfg.epochs} ({k} runs)"
    for inputs, labels in loop.progress(steps, description, len(first.train_batches)):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(inputs)
            loss = losses(logits, labels, smoothing)
            summed = loss.detach().float() * labels.shape[-1]
        for run in group:
            run.optimizer.zero_grad(set_to_none=True)
        # runs' losses are independent: the sum's gradient is each run's own (fp16 runs are never fused)
        first.scaler.scale(loss.sum()).backward()
        for run in group:
            run.step()
        loss_sum += summed
        hits += (logits.argmax(dim=-1) == labels).sum(dim=-1)
        seen += labels.shape[-1]
    totals = torch.stack([loss_sum, hits.float(), seen.float()]).tolist()
    return [(loss / max(count, 1), hit / max(count, 1), int(count)) for loss, hit, count in zip(*totals)]


def losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Each run's mean cross-entropy with its own label smoothing, in one go: [K, B, classes] -> [K]. The formula
    of nn.CrossEntropyLoss(label_smoothing=e), (1 - e) * nll + e * mean over classes of -log p, written out because
    that class takes one smoothing per call: a call per run would launch K times the kernels per step."""
    log_p = logits.float().log_softmax(dim=2)
    nll = -log_p.gather(2, labels.unsqueeze(2)).squeeze(2)
    return ((1 - smoothing) * nll - smoothing * log_p.mean(dim=2)).mean(dim=1)


@torch.inference_mode()
def evaluate(forward: nn.Module, group: list[Run], dtype: torch.dtype | None, device: torch.device
             ) -> list[tuple[float, float]]:
    """Per run, mean cross-entropy (no label smoothing) and accuracy on its validation batches. Runs fused
    together share them (the same data, and no pretrained weights' own normalisation), so a Stack sees each batch
    once, expanded to every member."""
    if len(group) == 1:
        return [loop.evaluate(forward, group[0].val_batches, dtype, device)]
    forward.eval()
    k = len(group)
    loss_sum = torch.zeros(k, device=device)
    hits = torch.zeros(k, device=device, dtype=torch.long)
    seen = 0
    for inputs, labels in group[0].val_batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(inputs.expand(k, *inputs.shape))
        for i in range(k):
            loss_sum[i] += nn.functional.cross_entropy(logits[i].float(), labels, reduction="sum")
        hits += (logits.argmax(dim=2) == labels).sum(dim=1)
        seen += len(labels)
    return [(loss / max(seen, 1), hit / max(seen, 1)) for loss, hit in zip(loss_sum.tolist(), hits.tolist())]
