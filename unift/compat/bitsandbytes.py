"""bitsandbytes: the CPU AVX512-BF16 repack of 4-bit weights. Written against bitsandbytes 0.50.2.

`Linear4bit.forward` (bitsandbytes/nn/modules.py), on a CPU with AVX512-BF16 (`support_avx512bf16_for_cpu`,
set from the CPU flags in __init__), repacks the 4-bit weight into a CPU-specific layout on the first
forward in eval mode whose input needs no gradient (an evaluation, say). After it, gradients through
gemv_4bit are silently wrong and the state dict is corrupted (docs/performance.md, "Platform notes").
Turning the repack off keeps training correct, at no cost on GPUs. Applied per model by
unift.models.loading.load_model; tests/test_compat.py fails once the repack no longer happens.
"""

from __future__ import annotations

from typing import Any


def disable_cpu_bf16_repack(model: Any) -> int:
    """Turn the repack off in every 4-bit layer of `model`; returns how many layers there were."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
