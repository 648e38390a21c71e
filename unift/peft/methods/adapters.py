"""Bottleneck adapters (unift's own peft plugin, unift/peft/bottleneck.py): houlsby, pfeiffer, parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec
from unift.options import POSITIVE_INT, PROBABILITY, opt
from unift.peft import flags
from unift.peft.bottleneck import default_targets, parse_scaling
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules
from unift.peft.targets import require_roles

PLACEMENT_ROLES = {"houlsby": ("mlp_targets",), "pfeiffer": ("mlp_output",), "parallel": ("attention_targets",)}


def _check_adapter_scaling(value: Any) -> str:
    try:
        return str(parse_scaling(value))
    except ValueError as err:
        raise UniftError(f"--adapter_scaling: {err}") from None


@dataclass
class AdapterFlags:
    adapter_type: str = opt("houlsby", "houlsby (MLP, sequential), pfeiffer (MLP output), parallel (attention)",
                            group="adapters", choices=("houlsby", "pfeiffer", "parallel"))
    bottleneck_size: int = opt(256, "width of the adapter bottleneck", group="adapters", range=POSITIVE_INT)
    non_linearity: str = opt("tanh", "activation between down and up projections ('linear' makes it mergeable)",
                             group="adapters", choices=("tanh", "relu", "gelu", "silu", "sigmoid", "linear"))
    adapter_dropout: float = opt(0.0, "dropout on the adapter input", group="adapters", range=PROBABILITY)
    adapter_scaling: str = opt("1.0", "output scale: a number, or 'learned' (a trained scalar per layer)",
                               group="adapters", check=_check_adapter_scaling)
    adapter_init: str = opt("mam_adapter", "mam_adapter (up projection zero: starts as the identity) or bert "
                            "(normal 0.02, the original toolkit's default: changes the model before training)",
                            group="adapters", choices=("bert", "mam_adapter"))
    lora_target_modules: list[str] | None = flags.target_modules()


def _adapters_config(options: Any, spec: ModelSpec):
    from unift.peft.bottleneck import BottleneckConfig

    if not options.lora_target_modules:
        require_roles(spec, f"adapters --adapter_type {options.adapter_type}",
                      PLACEMENT_ROLES.get(options.adapter_type, ()))
    try:
        return BottleneckConfig(
            task_type=causal_lm(),
            target_modules=target_modules(options, spec, tuple(default_targets(spec, options.adapter_type))),
            adapter_type=options.adapter_type, bottleneck_size=options.bottleneck_size,
            non_linearity=options.non_linearity, adapter_dropout=options.adapter_dropout,
            scaling=options.adapter_scaling, init_weights=options.adapter_init,
        )
    except ValueError as err:
        raise UniftError(f"--peft_type adapters: {err}") from None


def _adapters_merge_check(config: Any) -> str:
    return getattr(config, "merge_refusal", "")


register_method(MethodSpec(
    name="adapters", build=_adapters_config, flags=AdapterFlags, aliases=("bottleneck",), order=50,
    merge_check=_adapters_merge_check,
    merge_note="only with --non_linearity linear (a non-linearity has no equivalent weight)",
    description="bottleneck adapters: houlsby (MLP, sequential), pfeiffer (MLP output), parallel (attention)",
))
