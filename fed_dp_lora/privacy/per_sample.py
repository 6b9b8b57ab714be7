"""Per-record gradients of trainable ``nn.Linear`` layers, built inside the one ordinary backward.

Every trainable tensor of our models is the weight (or bias) of a plain ``nn.Linear``: LoRA's
``lora_A``/``lora_B`` (also inside bitsandbytes LoRA layers, whose quantized base layers are
frozen) and the classification head inside PEFT's ``ModulesToSaveWrapper``. For such a layer
the gradient of record i is a small outer product that the backward has in hand anyway:

    y = x W^T + b,   dL_i/dW = sum_t g_i,t^T x_i,t,   dL_i/db = sum_t g_i,t

(t runs over the sequence, or is absent for a 2-D input such as the head's). :func:`attach`
swaps the forward of those layers for an autograd Function that computes exactly that into
``param.grad_sample`` (shape ``(B, *param.shape)``, float32) and returns no gradient for the
weight and bias, so autograd does not also build the summed ``.grad``: the per-record
gradients replace work the non-private step does, instead of adding to it.

The batch dimension is the first dimension of the layer's input (batch first); every other
leading dimension is summed, so the unit is one record, never one token.

Like ``.grad``, ``.grad_sample`` accumulates (a layer called twice in one forward adds both
contributions); whoever consumes it sets it back to None.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn


def _coverable(module: nn.Module) -> TypeGuard[nn.Linear]:
    """A layer whose forward is exactly nn.Linear's, with at least one trainable tensor.

    Subclasses that override forward (bitsandbytes' Linear4bit / Linear8bitLt dequantize
    their weight first) and layers whose forward is already swapped on the instance (e.g. an
    accelerate device hook) are left alone: their parameters are not covered.
    """
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
        and any(p.requires_grad for p in module.parameters(recurse=False))
    )


def covered_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The trainable parameters whose per-record gradients :func:`attach` would compute."""
    covered: set[nn.Parameter] = set()
    for module in model.modules():
        if _coverable(module):
            covered.update(p for p in module.parameters(recurse=False) if p.requires_grad)
    return covered


def uncovered_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters the fused path cannot handle (empty: it covers all)."""
    covered = covered_parameters(model)
    return [name for name, p in model.named_parameters() if p.requires_grad and p not in covered]


def _accumulate(param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    previous = getattr(param, "grad_sample", None)
    if isinstance(previous, torch.Tensor) and previous.shape == grad_sample.shape:
        param.grad_sample = previous + grad_sample  # type: ignore[attr-defined]  # Opacus' convention
    else:
        param.grad_sample = grad_sample  # type: ignore[attr-defined]


class _PerSampleLinear(torch.autograd.Function):
    """y = x W^T + b; backward: grad of x as usual, per-record grads of W and b into .grad_sample."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # The Parameter objects themselves, to hang .grad_sample on.
        ctx.weight, ctx.bias = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        batch = x.shape[0]
        g = grad_out.float()
        if x.dim() == 2:  # (B, in): one row per record, e.g. the classification head
            if ctx.weight.requires_grad:
                _accumulate(ctx.weight, g.unsqueeze(2) * x.float().unsqueeze(1))
            if ctx.bias is not None and ctx.bias.requires_grad:
                _accumulate(ctx.bias, g.clone() if g is grad_out else g)
        else:  # (B, T..., in): sum over the record's own positions, never across records
            g3 = g.reshape(batch, -1, g.shape[-1])
            if ctx.weight.requires_grad:
                x3 = x.float().reshape(batch, -1, x.shape[-1])
                _accumulate(ctx.weight, torch.bmm(g3.transpose(1, 2), x3))  # (B, out, in)
            if ctx.bias is not None and ctx.bias.requires_grad:
                _accumulate(ctx.bias, g3.sum(dim=1))
        # No gradient for weight and bias: autograd does not build the summed .grad.
        return grad_x, None, None


def _fused_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.dim() < 2:
            # No backward will run (evaluation), or no batch dimension to be per-record over.
            return F.linear(x, module.weight, module.bias)
        return _PerSampleLinear.apply(x, module.weight, module.bias)

    return forward


class FusedHandle:
    """The layers :func:`attach` changed; :meth:`remove` puts their own forward back."""

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        self.params = [p for m in modules for p in m.parameters(recurse=False) if p.requires_grad]

    def remove(self) -> None:
        """Restore nn.Linear's forward and drop any per-record gradient left behind."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        for p in self.params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        self.modules = []
        self.params = []


def attach(model: nn.Module) -> FusedHandle:
    """Compute per-record gradients for every trainable plain nn.Linear of `model`.

    Check :func:`uncovered_parameters` first: trainable tensors outside such layers get an
    ordinary .grad and no .grad_sample.
    """
    modules = [m for m in model.modules() if _coverable(m)]
    for module in modules:
        module.forward = _fused_forward(module)  # type: ignore[method-assign]  # removed by FusedHandle
    return FusedHandle(modules)
