"""The shared loop, run for real on the digits tensors (a few epochs, CPU)."""

from dataclasses import asdict

import pytest
import torch
from torch import nn

from pipeline import data, loop
from pipeline.config import Config
from pipeline.models import build_model

CPU = torch.device("cpu")


def train(digits, cfg: Config, callbacks=(), checkpoints=None, device=CPU):
    loop.seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg.model, digits.input_shape, digits.num_classes)
    train_batches, val_batches = data.training_batches(digits, cfg.train.batch_size, cfg.data.augment, cfg.seed,
                                                       device, drop_last=cfg.train.drop_last,
                                                       channels_last=cfg.train.channels_last)
    return loop.fit(model, train_batches, val_batches, cfg.train, device, callbacks, checkpoints)


def curves(result):
    return [{k: v for k, v in asdict(m).items() if k not in ("seconds", "samples_per_s")} for m in result.history]


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
    checkpoints = loop.Checkpoints(tmp_path, cfg.fingerprint())
    with pytest.raises(KeyboardInterrupt):
        train(digits, cfg, [StopAfter(2)], checkpoints)
    assert torch.load(checkpoints.last, weights_only=True)["epoch"] == 2
    resumed = train(digits, cfg, checkpoints=checkpoints)
    assert curves(resumed) == curves(straight)
    assert all(torch.equal(resumed.best_state[k], straight.best_state[k]) for k in straight.best_state)


def test_checkpoint_of_another_config_is_not_resumed(digits, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"train.epochs": 2})
    train(digits, cfg, checkpoints=loop.Checkpoints(tmp_path, "other-config"))
    result = train(digits, cfg, checkpoints=loop.Checkpoints(tmp_path, cfg.fingerprint()))
    assert len(result.history) == 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng"} <= set(best)


def test_early_stopping_stops_after_patience(digits, tiny_cfg):
    # lr so small that val accuracy plateaus at once
    cfg = tiny_cfg.with_overrides({"train.epochs": 30, "train.patience": 2, "train.lr": 1e-7,
                                   "train.scheduler": "none", "train.monitor": "val_accuracy"})
    result = train(digits, cfg)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("scheduler", ["none", "step", "plateau", "cosine", "onecycle"])
def test_every_optimizer_and_scheduler_trains(digits, tiny_cfg, optimizer, scheduler):
    cfg = tiny_cfg.with_overrides({"model.name": "mlp", "train.epochs": 2, "train.optimizer": optimizer,
                                   "train.scheduler": scheduler, "train.step_size": 1, "train.nesterov": True,
                                   "train.weight_decay": 1e-4, "train.grad_clip": 1.0, "train.label_smoothing": 0.1,
                                   "train.lr": 0.01})
    result = train(digits, cfg)
    assert result.history[-1].train_loss < result.history[0].train_loss * 1.5
    if scheduler in ("step", "cosine", "onecycle"):
        assert result.history[1].lr != result.history[0].lr


def test_callbacks_see_every_epoch_in_order(digits, tiny_cfg):
    seen = []

    class Recorder(loop.Callback):
        def on_fit_start(self, model, start_epoch):
            seen.append(("start", start_epoch))

        def on_epoch_end(self, metrics):
            seen.append(("epoch", metrics.epoch))

        def on_fit_end(self, result):
            seen.append(("end", result.best_epoch > 0))

    train(digits, tiny_cfg, [Recorder()])
    assert seen == [("start", 1), ("epoch", 1), ("epoch", 2), ("epoch", 3), ("end", True)]


def test_diverging_loss_raises(digits, tiny_cfg):
    class Explodes(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) * float("nan")

    train_batches, val_batches = data.training_batches(digits, 64, tiny_cfg.data.augment, 0, CPU)
    with pytest.raises(loop.NonFiniteLossError, match="training loss became nan in epoch 1"):
        loop.fit(Explodes(), train_batches, val_batches, tiny_cfg.train, CPU)


def test_device_and_precision_resolution():
    assert loop.resolve_device("cpu") == CPU
    assert loop.autocast_dtype("auto", CPU) is None
    assert loop.autocast_dtype("bf16", CPU) == torch.bfloat16


@pytest.mark.gpu
def test_cuda_mixed_precision_channels_last_and_compile(digits, tiny_cfg):
    cuda = torch.device("cuda")
    cfg = tiny_cfg.with_overrides({"train.device": "cuda", "train.precision": "auto", "train.channels_last": True,
                                   "train.epochs": 5})
    result = train(digits, cfg, device=cuda)
    assert result.best.val_accuracy > 0.9
    fp16 = train(digits, cfg.with_overrides({"train.precision": "fp16", "train.compile": True}), device=cuda)
    assert fp16.best.val_accuracy > 0.9
