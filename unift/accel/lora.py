"""LoRA's forward and backward as one autograd function (`--optimizations fused_lora`).

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` in separate modules: dropout writes a full
copy of the input for each of the seven projections of a layer (and autograd keeps every copy), the base
layer writes its output, the adapter's scaled product is added into a second output, and the backward
pass sums the base's and the adapter's input gradients from two full tensors. Here, for a vanilla LoRA
layer with one active adapter over a frozen `nn.Linear`:

    out    = x @ W.T + bias                         the base matmul, computed here
    h      = dropout(x) @ A.T                       the masked copy of x lives only inside this call
    out   += scaling / (1 - p) * h @ B.T            in place: one addmm, no second output
    grad_x = mask * (grad_h @ A) + grad @ W         one buffer, the base's part added in place

Autograd keeps only x (which the projections of one input share), the rank-r activations h and the
dropped positions; the backward pass masks x again where it needs it. The mask has the distribution of
torch's dropout (unift.accel.dropout draws it); the maths is PEFT's, as tests/test_accel.py checks
against PEFT's own layers. A base that is not a frozen nn.Linear (quantized, or trained) keeps its own
forward and only the adapter's part is fused; anything else (DoRA, several adapters, a merged or
disabled adapter, LoRA biases) falls back to PEFT's forward. Measured on the standard workload
(docs/performance.md): computing the base here and adding in place took 0.95x the time per forward and
backward pass of fusing the adapter's part alone (bench/step_ab.py's method, 30 paired batches).
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


class _Lora(torch.autograd.Function):
    """`weight` given: out = x @ weight.T + bias + delta (a frozen base, computed here). `weight` None:
    out = base_out + delta, the base computed outside."""

    @staticmethod
    def forward(ctx, x, base_out, weight, bias, weight_a, weight_b, alpha: float, p: float, dtype: torch.dtype):
        xc = x.to(dtype).contiguous()
        a, b = weight_a.to(dtype), weight_b.to(dtype)  # cast once; the backward pass reuses them
        positions = None
        if p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator: seeded and checkpointed
            positions = dropped_positions(xc.numel(), p, seed).to(x.device)
            h = _without(xc, positions) @ a.t()
        else:
            h = xc @ a.t()
        if weight is None:
            out = torch.addmm(base_out.to(dtype), h, b.t(), alpha=alpha)
        else:
            w = weight.to(dtype)
            out = xc @ w.t() if bias is None else torch.addmm(bias.to(dtype), xc, w.t())
            out.addmm_(h, b.t(), alpha=alpha)
        ctx.save_for_backward(xc, h, a, b, positions, weight)
        ctx.alpha = alpha
        ctx.dtypes = (x.dtype, None if base_out is None else base_out.dtype, weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, h, a, b, positions, weight = ctx.saved_tensors
        x_dtype, base_dtype, a_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        grad = grad.to(a.dtype)
        grad_x = grad_base = grad_a = grad_b = None
        if need[5]:
            grad_b = (h.t() @ grad).t().to(b_dtype).mul_(ctx.alpha)
        grad_h = (grad @ b).mul_(ctx.alpha)  # [N, r]
        if need[4]:
            dropped_x = xc if positions is None else _without(xc, positions)
            grad_a = (grad_h.t() @ dropped_x).to(a_dtype)
        if need[0]:
            # the base's and the adapter's input gradients in one buffer
            if weight is not None and positions is None:
                grad_x = grad @ weight.to(grad.dtype)
                grad_x.addmm_(grad_h, a)
            else:
                grad_x = grad_h @ a
                if positions is not None:
                    grad_x.view(-1).index_fill_(0, positions, 0)  # dropped entries get no adapter gradient
                if weight is not None:
                    grad_x.addmm_(grad, weight.to(grad.dtype))
            grad_x = grad_x.to(x_dtype)
        if need[1]:
            grad_base = grad.to(base_dtype)
        return grad_x, grad_base, None, None, grad_a, grad_b, None, None, None


def _frozen_linear(layer: torch.nn.Module) -> bool:
    """Whether the base is a plain nn.Linear nothing trains, which the fused function can compute itself."""
    return (type(layer) is torch.nn.Linear and not layer.weight.requires_grad and not layer._forward_hooks
            and not layer._forward_pre_hooks and (layer.bias is None or not layer.bias.requires_grad))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs):
    """Bound as `forward` on a peft LoRA Linear; PEFT's own forward wherever the fused path does not apply."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
            or name in self.lora_variant or getattr(self, "lora_bias", {}).get(name, False)
            or not torch.is_grad_enabled()):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    alpha = float(self.scaling[name]) / (1.0 - p)  # LoRA's scaling and dropout's 1 / (1 - p), applied once
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    base = self.base_layer
    if _frozen_linear(base):
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        shape = (*x.shape[:-1], base.out_features)
        with torch.autocast(device, enabled=False):
            out = _Lora.apply(x.reshape(-1, x.shape[-1]), None, base.weight, base.bias, self.lora_A[name].weight,
                              self.lora_B[name].weight, alpha, p, dtype)
        return out.view(shape)
    result = base(x)
    dtype = torch.get_autocast_dtype(device) if autocast else result.dtype
    shape = result.shape
    with torch.autocast(device, enabled=False):
        out = _Lora.apply(x.reshape(-1, x.shape[-1]), result.reshape(-1, shape[-1]), None, None,
                          self.lora_A[name].weight, self.lora_B[name].weight, alpha, p, dtype)
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
