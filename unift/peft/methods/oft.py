"""OFT: orthogonal fine-tuning, block-diagonal rotations of the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.models.registry import ModelSpec
from unift.options import POSITIVE_INT, opt
from unift.peft import flags
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules


@dataclass
class OftFlags:
    oft_block_size: int = opt(32, "size of the orthogonal blocks (must divide the adapted layers' inputs)",
                              group="oft", range=POSITIVE_INT)
    lora_target_modules: list[str] | None = flags.target_modules()


def _oft_config(options: Any, spec: ModelSpec):
    from peft import OFTConfig

    # r=0 and a block size: the block size must divide every targeted layer's input width.
    return OFTConfig(task_type=causal_lm(), r=0, oft_block_size=options.oft_block_size,
                     target_modules=target_modules(options, spec))


register_method(MethodSpec(
    name="oft", build=_oft_config, flags=OftFlags, order=43,
    description="orthogonal fine-tuning: block-diagonal rotations of the weights",
))
