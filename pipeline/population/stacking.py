"""Several same-shaped models as one module: the forward pass of a population of runs (see `engine`).

`Stack(models)` takes a batch per member, stacked as [K, B, ...], and returns
logits [K, B, classes]. Each member keeps its own parameters (so its own
optimizer and learning rate) and buffers. Models with the same `signature`
(`fusion.signature`: Sequential models of the zoo's plain layers, with the same
widths) are fused
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

Other models (ResNets, pretrained backbones) have no signature: the engine trains
them one after another. Member k computes the operations its model computes
alone, on its own parameters, so the numbers agree up to float rounding (a
grouped kernel may sum in another order).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.population.fusion import members_per_call, signature

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
        self.chunk: int | None = None  # members fused per call, set by the first batch (`fusion.members_per_call`)
        # per dropout layer, each member's keep probability: on the device once, not copied there (a host sync on
        # a GPU) every step; None where every member keeps everything
        self._keep: dict[int, torch.Tensor | None] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.chunk is None:
            self.chunk = min(len(inputs), members_per_call(self.members[0], inputs.shape[1], tuple(inputs.shape[-2:]),
                                                           inputs.device))
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
