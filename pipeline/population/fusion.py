"""The one rule of what a population may fuse: which runs share a forward pass, and which gain from company.

Everything that decides it lives here, and every caller asks here: the engine
(which runs it groups) and the search (which params a population's trials
hold equal, which trials train alone); a config's seed replicates are a
single group.

- `fusion_key`: runs with equal keys are computed by one `stacking.Stack`: the same
  model `signature` (layers, settings, widths), batch size and batches per
  epoch, precision and memory format. A run with no key trains on its own.
- `OWN_PER_RUN`: the settings that never enter the key, so each run of a
  group may have its own: its optimizer and schedule, dropout rate and
  augmentation draws. Every other setting fixes shapes or kernels.
- `alone`: a run gains nothing from company, though it may be fused: this
  device would compute its members one per call (`members_per_call`), or its
  batches stream from disk (each member would start its own readers).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline import batching, devices
from pipeline.loop import Run

# Config keys a run of a fused group may have of its own (the search lets each trial draw them;
# tests/test_population.py fuses runs differing in every one). Augmentation (data.augment.*) too: each run draws
# its own from its own generator.
OWN_PER_RUN = ("train.lr", "train.optimizer", "train.momentum", "train.nesterov", "train.weight_decay",
               "train.scheduler", "train.step_size", "train.gamma", "train.label_smoothing", "train.grad_clip",
               "train.patience", "train.monitor_window", "model.dropout")
OWN_PREFIXES = ("data.augment.",)


def own_per_run(key: str) -> bool:
    """Whether runs that differ in config key `key` may still be fused."""
    return key in OWN_PER_RUN or key.startswith(OWN_PREFIXES)


def fusion_key(run: Run, device: torch.device) -> tuple | None:
    """What runs computed by one forward pass share; None: the run is never fused.

    The batch size itself, not only the batches per epoch: 63 and 64 give digits' 1221 training images 20
    batches each, of other sizes. Never fused: models without a signature (ResNets, pretrained backbones), fp16
    (each run keeps its own loss scale), torch.compile (it compiles one model)."""
    shared, dtype = signature(run.model), run.dtype(device)
    if shared is None or dtype == torch.float16 or run.cfg.compile:
        return None
    return shared, run.cfg.batch_size, len(run.train_batches), dtype, devices.uses_channels_last(run.cfg, run.model)


def groups(runs: list[Run], device: torch.device) -> list[list[Run]]:
    """The runs one forward pass computes together (equal `fusion_key`); each run without a key on its own."""
    grouped: dict = {}
    for run in runs:
        grouped.setdefault(fusion_key(run, device) or id(run), []).append(run)
    return list(grouped.values())


def alone(run: Run, device: torch.device, image_size: tuple[int, int]) -> bool:
    """A run that gains nothing from company: never fused, computed one member per call on this device, or
    streamed. A population around it would only take turns, hold K models in memory, and (in a search) narrow
    the others' params to its own for nothing."""
    return (fusion_key(run, device) is None or isinstance(run.train_batches, batching.StreamBatches)
            or members_per_call(run.model, run.cfg.batch_size, image_size, device) == 1)


def members_per_call(model: nn.Sequential, batch_size: int, image_size: tuple[int, int], device: torch.device
                     ) -> int:
    """How many same-shaped members one fused forward pass should compute: all of them, or (on a CPU, large
    convolutions) one at a time.

    A GPU computes a grouped convolution over K members as fast as one member's while its step waits on the
    host, and small models' steps do. A CPU computes the sum of the members' arithmetic either way, and a
    grouped kernel pays only while each member's activations stay small enough to live in its caches (`make
    bench` measures the population rows either side of `CPU_CONV_MEMBER_VALUES`). Linear layers fuse into
    batched matrix products, which gain at every size.
    """
    first = next((layer for layer in model if isinstance(layer, nn.Conv2d)), None)
    if device.type != "cpu" or first is None:
        return ALL
    values = batch_size * first.out_channels * image_size[0] * image_size[1]  # one member's first conv output
    return ALL if values <= CPU_CONV_MEMBER_VALUES else 1


ALL = 2**31 - 1  # no limit
CPU_CONV_MEMBER_VALUES = 2**18  # digits' 8x8 CNNs at every batch size searched fit; 28x28 images at batch 16 do not


FUSED_LAYERS = (nn.Flatten, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout)
# per layer type, the settings members must share to be fused (their weights' shapes are compared too)
_SETTINGS = {nn.Conv2d: ("stride", "padding", "dilation", "groups", "padding_mode"),
             nn.BatchNorm2d: ("eps", "momentum", "affine", "track_running_stats"),
             nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
             nn.Flatten: ("start_dim", "end_dim")}


def signature(model: nn.Module) -> tuple | None:
    """What models computed by one Stack share (layer types, settings, weight shapes); None if it cannot be fused."""
    if not isinstance(model, nn.Sequential) or any(type(layer) not in FUSED_LAYERS for layer in model):
        return None
    layers = []
    for layer in model:
        if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
            return None  # the fused layout flattens everything after the batch dimension
        if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats and layer.momentum):
            return None  # the fused BatchNorm keeps running statistics by exponential average, as the zoo's do
        settings = tuple(getattr(layer, name) for name in _SETTINGS.get(type(layer), ()))
        layers.append((type(layer).__name__, settings,
                       tuple(tuple(value.shape) for value in layer.state_dict().values())))
    return tuple(layers)
