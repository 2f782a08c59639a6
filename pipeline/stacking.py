"""Several same-shaped models as one module: the forward pass of a population of runs (see `loop.fit_together`).

`Stack(models)` takes a batch per member, stacked as [K, B, ...], and returns
logits [K, B, classes]. Each member keeps its own parameters (so its own
optimizer and learning rate) and buffers. Models with the same `signature`
(Sequential models of the zoo's plain layers, with the same widths) are fused
into one set of kernels for all K members:

- member k's convolution is group k of one grouped convolution (its channels
  are block k of a [B, K*C, H, W] activation);
- its BatchNorm is block k of one BatchNorm over K*C channels (statistics stay
  per member, and the running statistics are written back to each member);
- its linear layer is batch k of one batched matrix product ([K, B, F] activations);
- its dropout keeps its own rate.

Other models (ResNets, pretrained backbones) have no signature: the loop trains
them one after another. Member k computes the operations its model computes
alone, on its own parameters, so the numbers agree up to float rounding (a
grouped kernel may sum in another order).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
        if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats):
            return None
        settings = tuple(getattr(layer, name) for name in _SETTINGS.get(type(layer), ()))
        layers.append((type(layer).__name__, settings,
                       tuple(tuple(value.shape) for value in layer.state_dict().values())))
    return tuple(layers)


class Stack(nn.Module):
    """K models computed as one: input [K, B, ...] (member k's batch at k), output [K, B, classes]."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        shared = signature(models[0])
        if shared is None or any(signature(model) != shared for model in models[1:]):
            raise ValueError("Stack takes Sequential models of the same fusable layers and shapes (see signature)")
        self.members = nn.ModuleList(models)
        self.chunk: int | None = None  # members fused per call, set by the first batch (see `fused_at_once`)
        # per dropout layer, each member's keep probability: on the device once, not copied there (a host sync on
        # a GPU) every step; None where every member keeps everything
        self._keep: dict[int, torch.Tensor | None] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.chunk is None:
            self.chunk = fused_at_once(self.members[0], inputs)
        if self._keep is None:
            self._keep = {i: torch.tensor([1.0 - each.p for each in layers], device=inputs.device)
                          if any(each.p for each in layers) else None
                          for i, layers in enumerate(zip(*self.members)) if isinstance(layers[0], nn.Dropout)}
        members = list(self.members)
        if self.chunk >= len(members):
            return _fused(members, inputs, self._keep)
        return torch.cat([_fused(members[i:i + self.chunk], inputs[i:i + self.chunk],
                                 {layer: None if keep is None else keep[i:i + self.chunk]
                                  for layer, keep in self._keep.items()})
                          for i in range(0, len(members), self.chunk)])


def fused_at_once(model: nn.Sequential, inputs: torch.Tensor) -> int:
    """How many members one fused call computes, for inputs [K, B, C, H, W] (see `members_per_call`)."""
    return min(len(inputs), members_per_call(model, inputs.shape[1], tuple(inputs.shape[-2:]), inputs.device))


def members_per_call(model: nn.Sequential, batch_size: int, image_size: tuple[int, int], device: torch.device
                     ) -> int:
    """How many same-shaped members one fused forward pass should compute: all of them, or (on a CPU, large
    convolutions) one at a time.

    On a CPU, fusing convolutions pays only while each member's activations are small. Measured here (2 cores,
    bf16 + channels_last, training rounds, per member; values at the first convolution's output): digits 8x8 at
    batch 32/64/128 (65K-262K values) 1.67x/1.50x/1.25x faster, 16 members fused; 28x28 at batch 16/32 (401K-803K)
    0.80-0.89x, 2-5 fused; 16x16 at batch 64 (512K) 0.54x. Linear layers gained at every size measured (1.1-1.9x).
    """
    first = next((layer for layer in model if isinstance(layer, nn.Conv2d)), None)
    if device.type != "cpu" or first is None:
        return ALL
    values = batch_size * first.out_channels * image_size[0] * image_size[1]  # one member's first conv output
    return ALL if values <= CPU_CONV_MEMBER_VALUES else 1


ALL = 2**31 - 1  # no limit
CPU_CONV_MEMBER_VALUES = 2**18


def _fused(members: list[nn.Module], inputs: torch.Tensor, keep: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """The members' forward passes as one: input [K, B, ...], output [K, B, classes]; `keep`: per dropout layer,
    each member's keep probability (see Stack)."""
    k, b = inputs.shape[:2]
    h, stacked = inputs, True  # stacked: [K, B, ...]; else channel blocks: [B, K*C, H, W]
    for index, layers in enumerate(zip(*members)):  # the i-th layer of every member
        layer = layers[0]
        if stacked and h.dim() == 5 and isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)):
            h, stacked = _channel_blocks(h, layer), False
        if isinstance(layer, nn.Conv2d):
            bias = torch.cat([each.bias for each in layers]) if layer.bias is not None else None
            h = F.conv2d(h, torch.cat([each.weight for each in layers]), bias, layer.stride, layer.padding,
                         layer.dilation, layer.groups * k)
        elif isinstance(layer, nn.BatchNorm2d):
            h = _batch_norm(h, layers)
        elif isinstance(layer, nn.Linear):
            weight = torch.stack([each.weight for each in layers]).transpose(1, 2)  # [K, in, out]
            h = torch.bmm(h, weight) if layer.bias is None else \
                torch.baddbmm(torch.stack([each.bias for each in layers]).unsqueeze(1), h, weight)
        elif isinstance(layer, nn.Flatten):
            h, stacked = (h.flatten(2) if stacked else h.reshape(b, k, -1).transpose(0, 1)), True
        elif isinstance(layer, nn.Dropout):
            h = _dropout(h, keep[index], stacked) if layer.training and keep[index] is not None else h
        else:  # ReLU, MaxPool2d: the same for every member, channel by channel
            h = layer(h)
    return h if stacked else h.reshape(b, k, -1).transpose(0, 1)


def _channel_blocks(h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """[K, B, C, H, W] -> [B, K*C, H, W], in channels_last when the members' weights are (what the loop chose)."""
    k, b, c, height, width = h.shape
    blocks = h.transpose(0, 1).reshape(b, k * c, height, width)
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
            and not weight.is_contiguous():
        return blocks.contiguous(memory_format=torch.channels_last)
    return blocks


def _batch_norm(h: torch.Tensor, layers: tuple[nn.BatchNorm2d, ...]) -> torch.Tensor:
    """One BatchNorm over K*C channels: per-channel statistics are per member already."""
    layer = layers[0]
    weight, bias = torch.cat([each.weight for each in layers]), torch.cat([each.bias for each in layers])
    mean, var = torch.cat([each.running_mean for each in layers]), torch.cat([each.running_var for each in layers])
    if not layer.training:
        return F.batch_norm(h, mean, var, weight, bias, False, 0.0, layer.eps)
    out = F.batch_norm(h, mean, var, weight, bias, True, layer.momentum, layer.eps)  # updates mean/var in place
    with torch.no_grad():  # each member's running statistics, as its own BatchNorm would have left them
        torch._foreach_copy_([each.running_mean for each in layers], list(mean.chunk(len(layers))))
        torch._foreach_copy_([each.running_var for each in layers], list(var.chunk(len(layers))))
        torch._foreach_add_([each.num_batches_tracked for each in layers], 1)
    return out


def _dropout(h: torch.Tensor, keep: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Inverted dropout with member k's own keep probability `keep[k]` (a member keeping 1 is left exactly as it
    is)."""
    k = len(keep)
    shape = [k] + [1] * (h.dim() - 1) if stacked else [1, k] + [1] * (h.dim() - 1)
    view = h if stacked else h.unflatten(1, (k, -1))
    keep = keep.to(h.dtype).view(shape)
    out = view * (torch.rand_like(view) < keep) / keep
    return out if stacked else out.flatten(1, 2)
