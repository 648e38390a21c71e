"""IA3: learned rescaling vectors on keys, values and the MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.models.registry import ModelSpec
from unift.peft import flags
from unift.peft.bottleneck import attention_inputs
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules
from unift.peft.targets import require_roles

KEY_VALUE = ("k_proj", "v_proj")


@dataclass
class IA3Flags:
    lora_target_modules: list[str] | None = flags.target_modules()


def ia3_targets(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets): keys, values (or the fused qkv projection) and the MLP output,
    whose input is rescaled, as in the IA3 paper."""
    attention = [t for t in spec.attention_targets if t in KEY_VALUE] or attention_inputs(spec)
    return [*attention, spec.mlp_output], [spec.mlp_output]


def _ia3_config(options: Any, spec: ModelSpec):
    from peft import IA3Config

    if not options.lora_target_modules:
        require_roles(spec, "ia3", ("attention_targets", "mlp_output"))
    default, feedforward = ia3_targets(spec)
    targets = target_modules(options, spec, tuple(default))
    feedforward = [t for t in targets if t in feedforward]
    return IA3Config(task_type=causal_lm(), target_modules=targets, feedforward_modules=feedforward)


register_method(MethodSpec(
    name="ia3", build=_ia3_config, flags=IA3Flags, quantization_bits=(4, 8), order=40, trains_matrices=False,
    description="learned rescaling vectors on keys, values and the MLP (IA3)",
))
