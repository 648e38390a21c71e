"""LoRA and its close variants: DoRA (weight decomposition) and QLoRA (over a 4-bit nf4 base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec
from unift.peft import flags
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules


@dataclass
class LoraFlags:
    lora_r: int = flags.lora_r()
    lora_alpha: int = flags.lora_alpha()
    lora_dropout: float = flags.lora_dropout()
    lora_target_modules: list[str] | None = flags.target_modules()


def lora_config(options: Any, spec: ModelSpec, **extra: Any):
    from peft import LoraConfig

    return LoraConfig(
        task_type=causal_lm(),
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules(options, spec),
        **extra,
    )


def _dora_config(options: Any, spec: ModelSpec):
    return lora_config(options, spec, use_dora=True)


def _dora_validate(args: Any) -> None:
    import torch

    if args.quantization_bit == 8 and not torch.cuda.is_available():
        # Seen with peft 0.21.2 + bitsandbytes 0.50.2: the first step after DoRA's weight-norm pass fails in
        # the 8-bit matmul (its scale statistics are gone). 4-bit works.
        raise UniftError("--peft_type dora over an 8-bit base fails on CPU (bitsandbytes loses the 8-bit "
                         "scales in DoRA's weight-norm pass); use --quantization_bit 4 or --peft_type lora")


register_method(MethodSpec(
    name="lora", build=lora_config, flags=LoraFlags, quantization_bits=(4, 8), order=10, additive_merge=True,
    description="low-rank adapters on the linear layers (optionally over an 8- or 4-bit base)",
))
register_method(MethodSpec(
    name="dora", build=_dora_config, flags=LoraFlags, quantization_bits=(4, 8), order=11,
    validate=_dora_validate, quantization_note="4-bit; 8-bit on GPU only",
    description="LoRA with weight decomposition (magnitude + direction)",
))
register_method(MethodSpec(
    name="qlora", build=lora_config, flags=LoraFlags, reads=("compute_dtype",), quantization_bit=4, order=12,
    gpu_optim="paged_adamw_32bit", additive_merge=True,
    description="LoRA over a 4-bit nf4 base (double quantization, --compute_dtype; paged AdamW on GPU)",
))
