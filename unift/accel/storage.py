"""Memory under fp32 compute: the frozen base (`--optimizations bf16_storage`) and the heap
(`--release_memory`).

bf16_storage: a CPU without native bf16 trains in fp32, but published checkpoints store bf16. Loaded for
fp32 compute, every frozen projection matrix takes 4 bytes per weight where 2 hold the same value: a
bf16 number widened to fp32 is exact, and narrowing it back loses nothing. So each frozen nn.Linear whose
weights are all bf16 values keeps them in bf16 and widens them at every use, inside its own forward and
backward (one cast per matmul; the standard workload trained no slower for it, measured). The products
are bit for bit those of the fp32 weights. A weight that is not a bf16 value (an fp32-trained or dequantized checkpoint)
stays as it is; the output layer and embeddings (tied, and read elsewhere) stay too.

--release_memory: glibc's malloc serves large blocks from memory maps only above a threshold it raises
each time such a block is freed (up to 32 MiB); a step's activations then come from the heap, and what a
step frees stays resident as heap the next step's tensors may not fit into. Fixing the threshold at
128 KiB returns every freed activation at once, so the peak RSS is that of the live tensors; each new
activation then costs page faults, which is why it is not a default (measured in docs/performance.md).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from unift.runtime import libc, trim_heap

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RELEASE_THRESHOLD = 128 * 1024


class _WidenedLinear(torch.autograd.Function):
    """x @ W.T + b with W stored narrower than x: widened here, in both passes; autograd keeps only the
    stored W (no fp32 copy lives between the passes)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


def _widened_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == self.weight.dtype:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _WidenedLinear.apply(x, self.weight, self.bias)


def _bf16_exact(weight: torch.Tensor) -> bool:
    return torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight)


def store_frozen_linears_in_bf16(model: torch.nn.Module) -> tuple[int, Callable[[], None]]:
    """Narrow every frozen fp32 nn.Linear whose weights are all bf16 values to bf16, in place (the output
    layer excepted); (how many, undo: widen them back, exactly)."""
    skip = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        skip.add(id(output))
    chosen = []
    for module in model.modules():
        if (type(module) is not torch.nn.Linear or id(module) in skip or module.weight.requires_grad
                or module.weight.dtype != torch.float32 or module.weight.device.type == "meta"
                or (module.bias is not None and module.bias.requires_grad)):
            continue
        if _bf16_exact(module.weight):
            chosen.append(module)
    for module in chosen:
        module.weight.data = module.weight.data.to(torch.bfloat16)
        module.forward = types.MethodType(_widened_forward, module)
    if chosen:
        trim_heap()  # the fp32 copies just freed would otherwise stay in the heap

    def undo() -> None:
        for module in chosen:
            module.weight.data = module.weight.data.to(torch.float32)
            module.__dict__.pop("forward", None)

    return len(chosen), undo


def release_freed_memory() -> bool:
    """Have glibc hand freed blocks of 128 KiB and more back to the system at once (process-wide). False
    where malloc is not glibc's."""
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, RELEASE_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, RELEASE_THRESHOLD))
