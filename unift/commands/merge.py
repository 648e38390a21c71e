"""`unift merge` (merge.py): fold the adapter into the base model."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ModelOptions
from unift.models.flags import DtypeFlags, ModelFlags, OutputFlags
from unift.options import NON_NEGATIVE, like, opt

# unift.inference.fidelity.DEFAULT_MAX_KL, written here so that building the flags does not import the inference
# package (a test keeps the two equal); docs/after_training.md has the measurements behind it.
DEFAULT_MAX_KL = 1e-3
# unift.inference.gguf_quant.QUANTS (the same test keeps them equal)
QUANT_CHOICES = ("auto", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q5_k_s",
                 "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


@dataclass
class MergeOptions(ModelOptions):
    adapter_dir: str | None = like(ModelFlags, "adapter_dir", required=True)
    merged_dir: str = opt(None, "folder for the merged model (loads with plain transformers)",
                          aliases=("--output_dir",), required=True)
    compute_dtype: str = like(DtypeFlags, "compute_dtype")
    export: str | None = opt(None, "gguf: also write model.gguf and an Ollama Modelfile (llama, qwen2); gguf-lora: "
                             "instead of a merged folder, the LoRA adapter in llama.cpp's format, its base as "
                             "GGUF and a Modelfile", choices=("gguf", "gguf-lora"))
    quant: str = opt("auto", "tensor type of the GGUF file (auto: f16 for half-precision weights, else f32); "
                     "K-quants (q4_k_m, q6_k, ...) need llama-cpp-python", choices=QUANT_CHOICES)
    overwrite: bool = like(OutputFlags, "overwrite")
    max_kl: float = opt(DEFAULT_MAX_KL, "refuse the merge when the merged folder, loaded back, departs from the adapter "
                        "model by more than this mean KL per token (nats), on a few records of the run's data",
                        range=NON_NEGATIVE)
    no_check: bool = opt(False, "skip loading the merged folder back to compare it with the adapter model")


OPTIONS = MergeOptions


def run(options: MergeOptions) -> None:
    from unift.inference.merge import merge

    merge(options.adapter_dir, options.merged_dir, base_model=options.model_name_or_path,
          model_type=options.model_type, compute_dtype=options.compute_dtype,
          trust_remote_code=options.trust_remote_code, overwrite=options.overwrite, export=options.export,
          quant=options.quant,
          device=options.device, template=options.template,
          check=not options.no_check, max_kl=options.max_kl)
