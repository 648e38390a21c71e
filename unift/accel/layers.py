"""Leaner backward passes for two layers every rotary family has (`--optimizations lean_layers`).

Autograd keeps what each small op needs, which for these layers is more than the layer needs:
- RMSNorm upcasts its input to fp32 and keeps that fp32 copy for the backward pass: 4 bytes per value.
  Here the bf16 input and one fp32 scale per token are kept instead, and the normalised values are
  recomputed in the backward pass (the forward arithmetic is transformers' own, op for op).
- The gated MLP (`act(gate) * up`) keeps the gate, the activation and the up projection. Here only the
  gate and the up projection are kept; the activation is recomputed in the backward pass.
On the standard workload these two cut the activations kept per step by about a sixth. Each patched
module is checked against its own forward on a random input when the patch is installed, and left alone
if they differ (a family with another norm or activation keeps its own code).

The outputs of both are then kept a second time by the projections that read them (LoRA keeps its input
for its weights' gradient): the normalised input of the attention and MLP projections, and
act(gate) * up for the down projection. Within a decoder layer these are recomputed from what the norm
and the MLP keep anyway, op for op (so bit for bit), when the backward pass needs them (`_Recompute`):
on the standard workload about 140 of the 450 MiB of activations a step keeps (the saved tensors' sizes), for
three elementwise passes per layer.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

_scopes = threading.local()
_RECIPE = object()


class _Recompute(torch.autograd.graph.saved_tensors_hooks):
    """While a decoder layer runs forward: a tensor offered with the recipe that made it is not kept by
    whatever saves it (or a view of it) for the backward pass; the recipe is kept instead and rerun there."""

    def __init__(self) -> None:
        self.offered: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self.outer = getattr(_scopes, "current", None)
        _scopes.current = self
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _scopes.current, self.outer = self.outer, None
        self.offered.clear()  # the packed recipes hold what they need; nothing else should
        super().__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        entry = self.offered.get(tensor.untyped_storage().data_ptr())
        # the weak reference tells the offered tensor from a later one given its freed memory
        if entry is None or entry[0]() is None or entry[0]().untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            return tensor
        return (_RECIPE, entry[1], tensor.shape, tensor.stride(), tensor.storage_offset())

    @staticmethod
    def _unpack(packed):
        if type(packed) is tuple and packed[0] is _RECIPE:
            _, recipe, shape, stride, offset = packed
            return recipe().as_strided(shape, stride, offset)
        return packed


def _offer(tensor: torch.Tensor, recipe: Callable[[], torch.Tensor]) -> None:
    scope = getattr(_scopes, "current", None)
    if scope is not None and tensor.is_contiguous() and tensor.storage_offset() == 0:
        scope.offered[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), recipe)


def _normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return weight * (x.float() * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return _normed(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        normed = xf * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            reduce = tuple(range(grad.dim() - 1))
            grad_weight = (grad * normed.to(x.dtype)).float().sum(reduce).to(weight.dtype)
        grad_normed = (grad * weight).float()
        # d/dx of x * rsqrt(mean(x^2) + eps)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    out = _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))
    if out.grad_fn is not None:  # what _RMSNorm keeps: the input and one scale per row
        x, weight, rstd = out.grad_fn.saved_tensors
        _offer(out, lambda: _normed(x, weight, rstd))
    return out


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = _SiluMul.apply(gate, up)
    _offer(out, lambda: F.silu(gate) * up)  # gate and up: what _SiluMul keeps
    return out


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_gate_up_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(_silu_mul(gate, up))


def _recomputing_layer_forward(self, *args, **kwargs):
    # under activation checkpointing the checkpoint's own hooks must see what the layer keeps
    if not torch.is_grad_enabled() or getattr(self, "gradient_checkpointing", False):
        return type(self).forward(self, *args, **kwargs)
    with _Recompute():
        return type(self).forward(self, *args, **kwargs)


def _is_silu(module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def _candidate(module) -> types.FunctionType | None:
    name = type(module).__name__
    if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
        return _rmsnorm_forward
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    if act is None or not _is_silu(act) or not hasattr(module, "down_proj"):
        return None
    if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
        return _gated_mlp_forward
    if hasattr(module, "gate_up_proj"):
        return _fused_gate_up_forward
    return None


def _same(module, forward, width: int, compute: torch.dtype) -> bool:
    """Does the patched forward give what the module's own does (values and input gradients)? Checked in
    eval mode (no dropout), on an input of the base's dtype, under the autocast training uses."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point() and not p.requires_grad]
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, width, generator=generator).to(device, floats[0] if floats else torch.float32)
    half = compute != torch.float32
    was_training = module.training
    module.eval()
    outs, grads = [], []
    try:
        for fn in (type(module).forward, forward):
            xi = x.clone().requires_grad_()
            with torch.enable_grad(), torch.autocast(device.type, dtype=compute, enabled=half):
                y = fn(module, xi)
            y.float().square().sum().backward()
            outs.append(y.detach().float())
            grads.append(xi.grad.float())
    finally:
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    tol = dict(atol=2e-2, rtol=2e-2) if half else dict(atol=1e-5, rtol=1e-4)
    return torch.allclose(*outs, **tol) and torch.allclose(*grads, **tol)


def _width(module) -> int | None:
    """Input width: a norm's weight length, or an MLP's output (= input) width."""
    if hasattr(module, "down_proj"):
        return getattr(module.down_proj, "out_features", None)
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def lean_layers(model: nn.Module, compute: torch.dtype) -> tuple[int, Callable[[], None]]:
    """Patch every matching RMSNorm and gated MLP in place, each kind after a check at the compute dtype
    training uses; (how many, undo)."""
    patched = []
    checked: dict[tuple, bool] = {}
    for module in model.modules():
        forward = _candidate(module)
        width = _width(module) if forward is not None else None
        if forward is None or width is None:
            continue
        key = (type(module), forward, width)
        if key not in checked:
            checked[key] = _same(module, forward, width, compute)
        if checked[key]:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    # each decoder layer (an entry of a ModuleList) holding a patched module recomputes its outputs
    holders = {id(m) for m in patched}
    for layers in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for layer in layers:
            if any(id(child) in holders for child in layer.children()):
                layer.forward = types.MethodType(_recomputing_layer_forward, layer)
                patched.append(layer)

    def undo() -> None:
        for module in patched:
            module.__dict__.pop("forward", None)

    return len(patched), undo
