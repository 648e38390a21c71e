"""VeRA: shared random low-rank matrices with trained scaling vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.models.registry import ModelSpec
from unift.options import POSITIVE_INT, opt
from unift.peft import flags
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules


@dataclass
class VeraFlags:
    vera_r: int = opt(256, "rank of VeRA's shared random matrices", group="vera", range=POSITIVE_INT)
    lora_dropout: float = flags.lora_dropout()
    lora_target_modules: list[str] | None = flags.target_modules()


def _vera_config(options: Any, spec: ModelSpec):
    from peft import VeraConfig

    return VeraConfig(task_type=causal_lm(), r=options.vera_r, vera_dropout=options.lora_dropout,
                      target_modules=target_modules(options, spec))


register_method(MethodSpec(
    name="vera", build=_vera_config, flags=VeraFlags, order=44, additive_merge=True, trains_matrices=False,
    description="shared random low-rank matrices with trained scaling vectors (VeRA)",
))
