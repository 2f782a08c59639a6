"""The shared loop, run for real on the digits tensors (a few epochs, CPU)."""

import signal
from dataclasses import asdict

import pytest
import torch
from torch import nn

from pipeline import batching, devices, loop, optim, training
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.metrics import TIMING
from pipeline.models import build_model

from helpers import member

CPU = torch.device("cpu")


def train(digits, cfg: Config, callbacks=(), checkpoints=None, device=CPU):
    model, train_batches, val_batches = training.setup(cfg, digits, device)
    return loop.fit(model, train_batches, val_batches, cfg.train, device, callbacks, checkpoints)


def curves(result):
    return [{k: v for k, v in asdict(m).items() if k not in TIMING} for m in result.history]


def test_cnn_learns_digits(digits, tiny_cfg):
    result = train(digits, tiny_cfg.with_overrides({"train.epochs": 5}))
    assert result.best.val_accuracy > 0.9
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_same_params_give_identical_metrics_on_cpu(digits, tiny_cfg):
    cfg = tiny_cfg.with_overrides({"data.augment.crop_padding": 1, "model.dropout": 0.3})
    first, second = train(digits, cfg), train(digits, cfg)
    assert curves(first) == curves(second)
    assert all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)


class StopAfter(loop.Callback):
    """Simulates an interruption right after epoch `n` has been checkpointed."""

    def __init__(self, n):
        self.n = n

    def on_epoch_end(self, metrics):
        if metrics.epoch == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau"])
def test_resume_after_interrupt_matches_an_uninterrupted_run(digits, tiny_cfg, tmp_path, scheduler):
    cfg = tiny_cfg.with_overrides({"train.epochs": 4, "train.scheduler": scheduler, "data.augment.crop_padding": 1,
                                   "data.augment.rotation": 10, "data.augment.contrast": 0.2})
    straight = train(digits, cfg)
    with pytest.raises(KeyboardInterrupt):
        train(digits, cfg, [StopAfter(2)], loop.Checkpoints(tmp_path, "run"))
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 2
    seen = []

    class Seen(loop.Callback):
        def on_fit_start(self, model, history):
            seen.extend(m.epoch for m in history)

    resumed = train(digits, cfg, [Seen()], checkpoints=loop.Checkpoints(tmp_path, "run"))
    assert seen == [1, 2]  # callbacks learn which epochs the resumed run already has
    assert curves(resumed) == curves(straight)
    assert all(torch.equal(resumed.best_state[k], straight.best_state[k]) for k in straight.best_state)


def test_a_resumed_run_whose_validation_gets_worse_keeps_the_best_epoch_from_before_the_interruption(digits,
                                                                                                   tiny_cfg, tmp_path):
    """SGD at lr 0.1 on digits: epoch 1's val_loss is the best of three. Interrupted after epoch 1, the resumed run
    must still ship epoch 1 and its weights: a resume that forgot the best score so far would take epoch 2."""
    cfg = tiny_cfg.with_overrides({"train.epochs": 3, "train.optimizer": "sgd", "train.lr": 0.1,
                                   "train.scheduler": "none"})
    straight = train(digits, cfg)
    assert straight.best_epoch == 1 and straight.history[1].val_loss > straight.history[0].val_loss  # the premise
    with pytest.raises(KeyboardInterrupt):
        train(digits, cfg, [StopAfter(1)], loop.Checkpoints(tmp_path, "run"))
    resumed = train(digits, cfg, checkpoints=loop.Checkpoints(tmp_path, "run"))
    assert resumed.best_epoch == 1 and resumed.best_score == straight.best_score
    assert all(torch.equal(resumed.best_state[k], straight.best_state[k]) for k in straight.best_state)


def test_a_resume_point_is_only_resumed_by_its_own_key_and_never_destroyed_by_others(digits, tiny_cfg, tmp_path,
                                                                                    capsys):
    other = tiny_cfg.with_overrides({"train.epochs": 4, "train.lr": 0.02})
    with pytest.raises(KeyboardInterrupt):
        train(digits, other, [StopAfter(2)], loop.Checkpoints(tmp_path, "other"))
    cfg = tiny_cfg.with_overrides({"train.epochs": 4})
    result = train(digits, cfg, checkpoints=loop.Checkpoints(tmp_path, "mine"))
    assert curves(result) == curves(train(digits, cfg))  # trained from scratch, not from other's state
    assert "starting fresh: 1 resume point(s)" in capsys.readouterr().err
    assert torch.load(tmp_path / "other.pt", weights_only=True)["epoch"] == 2  # other's run can still resume
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "meta"} <= set(torch.load(tmp_path / "mine.pt",
                                                                                         weights_only=True))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated", "missing-key"])
def test_an_unreadable_resume_point_is_a_one_line_error_naming_it(digits, tiny_cfg, tmp_path, content):
    checkpoints = loop.Checkpoints(tmp_path, "run")
    train(digits, tiny_cfg.with_overrides({"train.epochs": 1}), checkpoints=checkpoints)
    good = checkpoints.path.read_bytes()
    if content == "truncated":
        content = good[: len(good) // 2]
    elif content == "missing-key":
        state = torch.load(checkpoints.path, weights_only=True)
        del state["optimizer"]
        torch.save(state, checkpoints.path)
        content = checkpoints.path.read_bytes()
    checkpoints.path.write_bytes(content)
    with pytest.raises(UserError) as err:
        train(digits, tiny_cfg, checkpoints=loop.Checkpoints(tmp_path, "run"))
    assert str(checkpoints.path) in str(err.value) and "delete it" in str(err.value)
    assert "\n" not in str(err.value)
    assert checkpoints.path.read_bytes() == content  # left for the user to inspect or delete


@pytest.mark.parametrize("window, ships", [(1, 2), (3, 6)])
def test_the_epoch_that_ships_ends_the_best_window_of_validation_values(digits, tiny_cfg, window, ships):
    """Epoch 2's val_loss is a lucky dip on a noisy curve: alone it is the best epoch, but the best 3-epoch mean
    ends at epoch 6, which ships (its weights, and its mean as the run's score)."""
    losses = [0.5, 0.1, 0.6, 0.3, 0.2, 0.2]
    run = member(tiny_cfg.with_overrides({"train.epochs": len(losses), "train.monitor_window": window}), digits)
    run.start(CPU)
    for epoch, loss in enumerate(losses, 1):
        with torch.no_grad():
            next(run.model.parameters()).fill_(epoch)  # tells the epochs' weights apart
        run.end_epoch((1.0, 0.5, 100), (loss, 0.9), 1.0)
    assert run.result.best_epoch == ships
    assert run.result.best_score == pytest.approx(sum(losses[ships - window:ships]) / window)
    assert next(iter(run.result.best_state.values())).flatten()[0] == ships


def test_early_stopping_stops_after_patience(digits, tiny_cfg):
    # lr so small that val accuracy plateaus at once
    cfg = tiny_cfg.with_overrides({"train.epochs": 30, "train.patience": 2, "train.lr": 1e-7,
                                   "train.scheduler": "none", "train.monitor": "val_accuracy"})
    result = train(digits, cfg)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop}
SCHEDULERS = {"none": type(None), "step": torch.optim.lr_scheduler.StepLR,
              "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
              "cosine": torch.optim.lr_scheduler.CosineAnnealingLR, "onecycle": torch.optim.lr_scheduler.OneCycleLR}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizers_are_built_as_configured(tiny_cfg, optimizer):
    cfg = tiny_cfg.with_overrides({"train.optimizer": optimizer, "train.lr": 0.03, "train.weight_decay": 1e-4,
                                   "train.momentum": 0.8, "train.nesterov": True}).train
    built = optim.build_optimizer(nn.Linear(2, 2).parameters(), cfg)
    group = built.param_groups[0]
    assert type(built) is OPTIMIZERS[optimizer]
    assert group["lr"] == 0.03 and group["weight_decay"] == 1e-4
    if optimizer in ("sgd", "rmsprop"):
        assert group["momentum"] == 0.8
    if optimizer == "sgd":
        assert group["nesterov"] is True
    assert bool(group.get("fused")) is (optimizer != "rmsprop")  # PyTorch has no fused RMSprop


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_optimizer_and_scheduler_trains(digits, tiny_cfg, optimizer, scheduler):
    cfg = tiny_cfg.with_overrides({"model.name": "mlp", "train.epochs": 2, "train.optimizer": optimizer,
                                   "train.scheduler": scheduler, "train.step_size": 1, "train.nesterov": True,
                                   "train.weight_decay": 1e-4, "train.grad_clip": 1.0, "train.label_smoothing": 0.1,
                                   "train.lr": 0.01})
    built, _ = optim.build_scheduler(optim.build_optimizer(nn.Linear(2, 2).parameters(), cfg.train), cfg.train, 10)
    assert type(built) is SCHEDULERS[scheduler]
    result = train(digits, cfg)
    assert result.history[-1].train_loss < result.history[0].train_loss
    if scheduler in ("step", "cosine", "onecycle"):
        assert result.history[1].lr != result.history[0].lr


def test_callbacks_see_every_epoch_in_order(digits, tiny_cfg):
    seen = []

    class Recorder(loop.Callback):
        def on_fit_start(self, model, history):
            seen.append(("start", len(history)))

        def on_epoch_end(self, metrics):
            seen.append(("epoch", metrics.epoch))

        def on_fit_end(self, result):
            seen.append(("end", result.best_epoch > 0))

    train(digits, tiny_cfg, [Recorder()])
    assert seen == [("start", 0), ("epoch", 1), ("epoch", 2), ("epoch", 3), ("end", True)]


def test_the_console_shows_a_run_at_a_rate_a_reader_can_follow(digits, tiny_cfg, capsys):
    now = [0.0]
    history = train(digits, tiny_cfg).history  # 3 epochs

    def replay(every: float, seconds_per_epoch: float) -> list[int]:
        console = training.ConsoleLog("cnn", 3, every=every, terminal=False, clock=lambda: now[0])
        console.on_fit_start(None, [])
        for m in history:
            now[0] += seconds_per_epoch
            console.on_epoch_end(m)
        console.on_fit_end(loop.FitResult(history, 3, 0.0, {}, False, 0.0))
        return [int(line.split("epoch")[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()]

    assert replay(every=0, seconds_per_epoch=1) == [1, 2, 3]
    assert replay(every=30, seconds_per_epoch=1) == []  # a short run: its stage's summary says how it went
    assert replay(every=30, seconds_per_epoch=20) == [2, 3]  # a long one: a line per 30 s, and its end
    assert replay(every=30, seconds_per_epoch=40) == [1, 2, 3]


def test_diverging_loss_raises(digits, tiny_cfg):
    class Explodes(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) * float("nan")

    train_batches, val_batches = batching.training_batches(digits, 64, tiny_cfg.data.augment, 0, CPU)
    with pytest.raises(loop.NonFiniteLossError, match="training loss became nan in epoch 1"):
        loop.fit(Explodes(), train_batches, val_batches, tiny_cfg.train, CPU)


def test_device_and_format_resolution(tiny_cfg):
    assert devices.resolve_device("cpu") == CPU
    native = " avx512_bf16" in open("/proc/cpuinfo").read() or " amx_bf16" in open("/proc/cpuinfo").read()
    assert devices.autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert devices.autocast_dtype("auto", CPU, convolutional=False) is None  # bf16 slows linear-only models here
    assert devices.autocast_dtype("bf16", CPU) == torch.bfloat16 and devices.autocast_dtype("fp32", CPU) is None
    cnn, mlp = (build_model(tiny_cfg.model.model_copy(update={"name": name}), (1, 8, 8), 10) for name in ("cnn", "mlp"))
    assert devices.uses_channels_last(tiny_cfg.train, cnn) and not devices.uses_channels_last(tiny_cfg.train, mlp)
    off = tiny_cfg.with_overrides({"train.channels_last": False}).train
    assert not devices.uses_channels_last(off, cnn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_missing_device_is_a_user_error(device):
    with pytest.raises(UserError, match=f"train.device={device}, but this machine has no CUDA device"):
        devices.resolve_device(device)


@pytest.mark.gpu
def test_cuda_mixed_precision_channels_last_and_compile(digits, tiny_cfg):
    cuda = torch.device("cuda")
    cfg = tiny_cfg.with_overrides({"train.device": "cuda", "train.precision": "auto", "train.channels_last": True,
                                   "train.epochs": 5})
    result = train(digits, cfg, device=cuda)
    assert result.best.val_accuracy > 0.9
    fp16 = train(digits, cfg.with_overrides({"train.precision": "fp16", "train.compile": True}), device=cuda)
    assert fp16.best.val_accuracy > 0.9


def test_processes_training_at_once_share_the_cores():
    assert devices.thread_count(None, 1, 16, None) == 16
    assert devices.thread_count(None, 4, 16, None) == 4 and devices.thread_count(None, 4, 2, None) == 1
    assert devices.thread_count(None, 1, 16, "1") == 1  # OMP_NUM_THREADS caps the share
    assert devices.thread_count(3, 4, 16, "1") == 3  # train.threads is what it says


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_callbacks_hear_of_an_epoch_waits_until_all_have(digits, tiny_cfg, number):
    """Ctrl-C or SIGTERM (the CLI raises both as KeyboardInterrupt) landing while the loop tells a run's callbacks
    that an epoch ended takes effect once every callback has it: tracking never keeps an epoch that the pruner,
    and so the Optuna trial, never saw."""

    class Heard(loop.Callback):
        def __init__(self, interrupt_at=None):
            self.epochs, self.interrupt_at = [], interrupt_at

        def on_epoch_end(self, metrics):
            self.epochs.append(metrics.epoch)
            if metrics.epoch == self.interrupt_at:
                signal.raise_signal(number)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    first, second = Heard(interrupt_at=2), Heard()
    previous = signal.signal(number, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(digits, tiny_cfg, [first, second])
        assert signal.getsignal(number) is interrupted  # the handler is back
    finally:
        signal.signal(number, previous)
    assert first.epochs == second.epochs == [1, 2]
