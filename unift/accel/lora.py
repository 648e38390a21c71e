"""LoRA's forward and backward as one autograd function (`--optimizations fused_lora`).

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: dropout writes a full copy of the
input for each of the seven projections of a layer (and autograd keeps every copy for the backward
pass), then come a scaling multiply and an addition over the whole output. Here, for a vanilla LoRA
layer with one active adapter:

    h   = dropout(x) @ A.T                          the masked copy of x lives only inside this call
    out = base(x) + scaling * h @ B.T               one addmm: scaling and the addition fused

Autograd keeps only x (which the projections of one input share), the rank-r activations h and the
dropped positions; the backward pass masks x again where it needs it. Against PEFT's layers with
unift's fast dropout this runs at the same speed and keeps about 50 MB less on the standard workload
(three of the seven projections of a layer share an input that PEFT copies per projection). The mask has the distribution of torch's dropout
(unift.accel.dropout draws it); the maths is the same as PEFT's, as tests/test_accel.py checks against
PEFT's own layers. Anything else (DoRA, several adapters, a merged or disabled adapter, LoRA biases)
falls back to PEFT's forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from unift.accel.dropout import dropped_positions


def _without(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of x with the entries at the (flat) positions zeroed: the dropped input, briefly."""
    out = x.clone()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_out, weight_a, weight_b, scaling: float, p: float, dtype: torch.dtype):
        xc = x.to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)  # cast once; the backward pass reuses them
        positions = None
        if p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator: seeded and checkpointed
            positions = dropped_positions(xc.numel(), p, seed).to(x.device)
            h = _without(xc, positions) @ a.t()
        else:
            h = xc @ a.t()
        alpha = scaling / (1.0 - p)  # LoRA's scaling and dropout's 1 / (1 - p), applied once, by addmm
        out = torch.addmm(base_out.to(dtype), h, b.t(), alpha=alpha)
        ctx.save_for_backward(xc, h, a, b, positions)
        ctx.alpha = alpha
        ctx.dtypes = (x.dtype, base_out.dtype, weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, h, a, b, positions = ctx.saved_tensors
        x_dtype, base_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad.to(a.dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = (grad.t() @ h).to(b_dtype).mul_(ctx.alpha)
        grad_h = (grad @ b).mul_(ctx.alpha)  # [N, r]
        if ctx.needs_input_grad[2]:
            dropped_x = xc if positions is None else _without(xc, positions)
            grad_a = (grad_h.t() @ dropped_x).to(a_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a
            if positions is not None:
                grad_x.view(-1).index_fill_(0, positions, 0)  # dropped entries get no gradient
            grad_x = grad_x.to(x_dtype)
        grad_base = grad.to(base_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_base, grad_a, grad_b, None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs):
    """Bound as `forward` on a peft LoRA Linear; PEFT's own forward wherever the fused path does not apply."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
            or name in self.lora_variant or getattr(self, "lora_bias", {}).get(name, False)
            or not torch.is_grad_enabled()):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else result.dtype
    shape = result.shape
    with torch.autocast(device, enabled=False):
        out = _LoraDelta.apply(x.reshape(-1, x.shape[-1]), result.reshape(-1, shape[-1]),
                               self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
                               p, dtype)
    return out.view(shape).to(result.dtype)


def fuse_lora_layers(model: torch.nn.Module) -> tuple[int, Callable[[], None]]:
    """Give every vanilla peft LoRA Linear the fused forward, in place; (how many, undo)."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear and not isinstance(m, AdaLoraLayer)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)

    return len(layers), undo
