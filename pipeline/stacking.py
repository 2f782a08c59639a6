"""Several same-shaped models as one module: the forward pass of a population of runs (see `loop.fit_together`).

`Stack(models)` takes a batch per member, stacked as [K, B, ...], and returns
logits [K, B, classes]. Each member keeps its own parameters (so its own
optimizer and learning rate) and buffers. Models with the same `signature`
(Sequential models of the zoo's plain layers, with the same widths) are fused
into one set of kernels for all K members:

- member k's convolution is group k of one grouped convolution (its channels
  are block k of a [B, K*C, H, W] activation);
- its BatchNorm is block k of one BatchNorm over K*C channels (statistics stay
  per member);
- its linear layer is batch k of one batched matrix product ([K, B, F] activations);
- its dropout keeps its own rate.

The members' parameters and buffers live in one tensor per layer and name
(member k's are block k of it, see `Fused`). The fused pass computes on those
tensors, so its backward accumulates one gradient per tensor, whatever K is, and
hands each member a view of its block; BatchNorm updates every member's running
statistics in place. Per step the cost in operations (kernel launches on a GPU)
does not grow with K, apart from each member's own optimizer step.

Other models (ResNets, pretrained backbones) have no signature: the loop trains
them one after another. Member k computes the operations its model computes
alone, on its own parameters, so the numbers agree up to float rounding (a
grouped kernel may sum in another order).
"""

from __future__ import annotations

import functools

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
        if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats and layer.momentum):
            return None  # the fused BatchNorm keeps running statistics by exponential average, as the zoo's do
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
        # per layer, its parameters and buffers of every member, by name (a member's own tensors become views)
        self.fused = [{name: Fused([getattr(layer, name) for layer in layers])
                       for name, _ in [*layers[0].named_parameters(), *layers[0].named_buffers()]}
                      for layers in zip(*models)]
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
        layers, k = list(self.members[0]), len(self.members)
        if self.chunk >= k:
            return _fused(layers, [{name: each.tensor for name, each in fused.items()} for fused in self.fused],
                          inputs, self._keep)
        outputs = []
        for start in range(0, k, self.chunk):
            stop = min(start + self.chunk, k)
            outputs.append(_fused(layers, [{name: each.block(start, stop) for name, each in fused.items()}
                                           for fused in self.fused], inputs[start:stop],
                                  {layer: None if keep is None else keep[start:stop]
                                   for layer, keep in self._keep.items()}))
        return torch.cat(outputs)


class Fused:
    """One parameter (or buffer) of K members as one tensor: their tensors concatenated along the first dimension
    (the layout the fused kernels take: a grouped convolution's weight, a BatchNorm's per-channel values, a
    batched matrix product's [K * out, in] weight), and each member's own tensor made a view of its block. So the
    members' optimizers and state dicts see the fused tensor's values, and the fused pass updates theirs.

    The fused parameter's gradient is one accumulation per backward; a hook hands each member the view of its
    block as its gradient and leaves the fused gradient empty for the next step (the members' `zero_grad`)."""

    def __init__(self, tensors: list[torch.Tensor]):
        first = tensors[0]
        self.rows = first.shape[0] if first.dim() else 1  # a member's block: rows [k * rows, (k + 1) * rows)
        # each block keeps its member's strides (a convolution's channels_last weight stays channels_last, which
        # picks its kernels): the first dimension is the outermost one in every memory format
        values = torch.empty_strided((len(tensors) * self.rows, *first.shape[1:]), first.stride() or (1,),
                                     dtype=first.dtype, device=first.device)
        self.tensor = nn.Parameter(values, first.requires_grad) if isinstance(first, nn.Parameter) else values
        for each, block in zip(tensors, _blocks(values, self.rows, first.dim())):
            block.copy_(each.detach())
            each.data = block
        if isinstance(self.tensor, nn.Parameter) and self.tensor.requires_grad:
            # not a bound method: the hook would hold this object, which holds the tensor that holds the hook, and
            # such a cycle frees (GPU) memory only when the garbage collector runs, not when the Stack goes
            self.tensor.register_post_accumulate_grad_hook(functools.partial(_hand_out_grad, tensors, self.rows))

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Members start..stop-1 (a chunk of them computed in one call)."""
        return self.tensor[start * self.rows:stop * self.rows]


def _blocks(values: torch.Tensor, rows: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Every member's block of fused `values` (one op, not one per member): views with the members' shape and
    strides. Not `.view(shape)`: it would renumber the strides of size-1 dimensions, and a convolution's kernel
    choice (so its rounding) follows them."""
    return values.split(rows) if dim else values.unbind()


def _hand_out_grad(members: list[torch.Tensor], rows: int, fused: torch.Tensor) -> None:
    """After a backward: each member's gradient is the view of its block of the fused gradient, and the fused
    parameter starts the next backward without one (as the members' `zero_grad` expects)."""
    grad, fused.grad = fused.grad, None
    for each, block in zip(members, _blocks(grad, rows, members[0].dim())):
        each.grad = block


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


def _fused(layers: list[nn.Module], tensors: list[dict[str, torch.Tensor]], inputs: torch.Tensor,
           keep: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """The members' forward passes as one: input [K, B, ...], output [K, B, classes]. `layers`: one member's
    layers (settings shared by all); `tensors`: per layer, every member's parameters and buffers (`Fused` blocks);
    `keep`: per dropout layer, each member's keep probability (see Stack)."""
    k, b = inputs.shape[:2]
    h, stacked = inputs, True  # stacked: [K, B, ...]; else channel blocks: [B, K*C, H, W]
    for index, (layer, fused) in enumerate(zip(layers, tensors)):
        if stacked and h.dim() == 5 and isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)):
            h, stacked = _channel_blocks(h, fused.get("weight")), False
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, fused["weight"], fused.get("bias"), layer.stride, layer.padding, layer.dilation,
                         layer.groups * k)
        elif isinstance(layer, nn.BatchNorm2d):
            h = _batch_norm(h, layer, fused)
        elif isinstance(layer, nn.Linear):
            weight = fused["weight"].view(k, layer.out_features, layer.in_features).transpose(1, 2)  # [K, in, out]
            h = torch.bmm(h, weight) if layer.bias is None else \
                torch.baddbmm(fused["bias"].view(k, 1, layer.out_features), h, weight)
        elif isinstance(layer, nn.Flatten):
            h, stacked = (h.flatten(2) if stacked else h.reshape(b, k, -1).transpose(0, 1)), True
        elif isinstance(layer, nn.Dropout):
            h = _dropout(h, keep[index], stacked) if layer.training and keep[index] is not None else h
        else:  # ReLU, MaxPool2d: the same for every member, channel by channel
            h = layer(h)
    return h if stacked else h.reshape(b, k, -1).transpose(0, 1)


def _channel_blocks(h: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """[K, B, C, H, W] -> [B, K*C, H, W], in channels_last when the members' weights are (what the loop chose)."""
    k, b, c, height, width = h.shape
    blocks = h.transpose(0, 1).reshape(b, k * c, height, width)
    if weight is not None and weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
            and not weight.is_contiguous():
        return blocks.contiguous(memory_format=torch.channels_last)
    return blocks


def _batch_norm(h: torch.Tensor, layer: nn.BatchNorm2d, fused: dict[str, torch.Tensor]) -> torch.Tensor:
    """One BatchNorm over K*C channels: per-channel statistics are per member already, and the running statistics
    it updates in place are the members' own (`Fused`)."""
    if layer.training:
        fused["num_batches_tracked"].add_(1)
    return F.batch_norm(h, fused["running_mean"], fused["running_var"], fused["weight"], fused["bias"],
                        layer.training, layer.momentum, layer.eps)


def _dropout(h: torch.Tensor, keep: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Inverted dropout with member k's own keep probability `keep[k]` (a member keeping 1 is left exactly as it
    is)."""
    k = len(keep)
    shape = [k] + [1] * (h.dim() - 1) if stacked else [1, k] + [1] * (h.dim() - 1)
    view = h if stacked else h.unflatten(1, (k, -1))
    keep = keep.to(h.dtype).view(shape)
    out = view * (torch.rand_like(view) < keep) / keep
    return out if stacked else out.flatten(1, 2)
