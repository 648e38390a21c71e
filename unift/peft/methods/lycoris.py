"""LyCORIS-style low-rank products: LoHa (Hadamard) and LoKr (Kronecker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.models.registry import ModelSpec
from unift.peft import flags
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules


@dataclass
class LycorisFlags:
    lora_r: int = flags.lora_r()
    lora_alpha: int = flags.lora_alpha()
    lora_target_modules: list[str] | None = flags.target_modules()


def _loha_config(options: Any, spec: ModelSpec):
    from peft import LoHaConfig

    return LoHaConfig(task_type=causal_lm(), r=options.lora_r, alpha=options.lora_alpha,
                      target_modules=target_modules(options, spec))


def _lokr_config(options: Any, spec: ModelSpec):
    from peft import LoKrConfig

    return LoKrConfig(task_type=causal_lm(), r=options.lora_r, alpha=options.lora_alpha,
                      target_modules=target_modules(options, spec))


register_method(MethodSpec(
    name="loha", build=_loha_config, flags=LycorisFlags, order=41, additive_merge=True,
    description="low-rank Hadamard product adapters (LyCORIS LoHa)",
))
register_method(MethodSpec(
    name="lokr", build=_lokr_config, flags=LycorisFlags, order=42, additive_merge=True,
    description="low-rank Kronecker product adapters (LyCORIS LoKr)",
))
