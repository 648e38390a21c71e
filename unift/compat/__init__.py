"""Patches of other libraries (transformers, peft, bitsandbytes, accelerate/deepspeed), each in one module
named for what it patches, each applied by an explicit call; importing a unift module applies none.

- `apply()`: the patches that change a library for the whole process (today the peft x transformers
  generation-cache fix). Idempotent. The entry points that build or load PEFT models call it (train(),
  Generator.load, merge(), unift.peft's wrap_model and load_adapter).
- per model or per process, called where they are needed: `peft_adapters` (AdaLoRA after wrapping and
  loading), `bitsandbytes` (4-bit models on CPU), `keep_out` (the CLI before anything is imported),
  `peft_types` (unift's bottleneck plugin), `quiet` (the CLI's logging set-up), `deepspeed_cpu` and
  `accelerate_fsdp` (DeepSpeed and FSDP runs without an accelerator), `trl_stages` (the preference stages'
  reference model).
- mixins that override private methods of other libraries' classes, each handing over to public methods of
  the unift class that uses it: `trainer_checkpoints` (staged checkpoints), `trainer_resume` (resuming
  under another engine or world size), `trl_preference` and `trl_grpo` (TRL's trainers on unift's rows),
  `badam_blocks` (the badam package's block order; imported where used, it imports badam).

This package imports no other unift module but unift.errors: everything else calls into it.
"""

from __future__ import annotations

from unift.compat import (
    accelerate_fsdp,
    bitsandbytes,
    deepspeed_cpu,
    generation_cache,
    keep_out,
    peft_adapters,
    peft_types,
    quiet,
    trainer_checkpoints,
    trainer_resume,
    trl_grpo,
    trl_preference,
    trl_stages,
)


def apply() -> None:
    """Apply every process-wide patch (idempotent). The entry points that build or load PEFT models call it;
    it imports the libraries it patches."""
    generation_cache.apply()


__all__ = ["accelerate_fsdp", "apply", "bitsandbytes", "deepspeed_cpu", "generation_cache", "keep_out", "peft_adapters", "peft_types", "quiet",
           "trainer_checkpoints", "trainer_resume", "trl_grpo", "trl_preference", "trl_stages"]
