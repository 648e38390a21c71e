"""`unift merge` (merge.py): fold the adapter into the base model."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ModelOptions
from unift.options import opt


@dataclass
class MergeOptions(ModelOptions):
    adapter_dir: str | None = opt(None, "run folder written by `unift train` (needs nothing else), or any PEFT "
                                  "adapter folder", group="model", aliases=("--lora_dir",), required=True)
    merged_dir: str = opt(None, "folder for the merged model (loads with plain transformers)",
                          aliases=("--output_dir",), required=True)
    compute_dtype: str = opt("auto", "dtype of the saved weights (default: the base checkpoint's; QLoRA: the "
                             "run's)", choices=("auto", "fp32", "bf16", "fp16"))
    export: str | None = opt(None, "also write a GGUF file (llama-type families)", choices=("gguf",))
    overwrite: bool = opt(False, "replace a non-empty --merged_dir")


OPTIONS = MergeOptions


def run(options: MergeOptions) -> None:
    from unift.engine.merge import merge

    merge(options.adapter_dir, options.merged_dir, base_model=options.model_name_or_path,
          model_type=options.model_type, compute_dtype=options.compute_dtype,
          trust_remote_code=options.trust_remote_code, overwrite=options.overwrite, export=options.export,
          device=options.device, template=options.template)
