"""One ModelSpec per --model_type. Adding a family is one entry here and one test."""

from __future__ import annotations

from dataclasses import dataclass

from unift.errors import UniftError

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_class: str  # transformers class used for native checkpoints (informational; loading uses Auto*)
    config_class: str  # transformers config class, used to build tiny test models
    lora_targets: tuple[str, ...]  # default LoRA targets: every linear layer of a block
    attention_targets: tuple[str, ...]  # attention projections (parallel adapters, IA3 keys)
    mlp_targets: tuple[str, ...]  # MLP projections (Houlsby adapters)
    mlp_output: str  # the MLP output projection (Pfeiffer adapters, IA3 feed-forward)
    template: str  # default prompt template; "auto" = the tokenizer's own chat template
    remote_code_note: str = ""  # which checkpoints of this family need --trust_remote_code
    config_overrides: tuple[tuple[str, object], ...] = ()  # fixed config values (InternLM 1 = llama + bias)
    aliases: tuple[str, ...] = ()
    # transformers' config.model_type values of its checkpoints (native and remote-code ones): how a base
    # model that arrives without --model_type (a foreign adapter's) is placed in the family
    hf_model_types: tuple[str, ...] = ()
    # How packed (padding-free) rows keep their examples apart: "position_ids" (restarting positions; the
    # family's causal mask follows them), "alibi_blocks" (Bloom), or "" (not supported: batches are padded).
    packing: str = "position_ids"
    # Set on copies made for a checkpoint whose module names differ (unift.peft.targets.spec_from_model):
    attention_output: str = ""  # the attention output projection, when its name is not a known one
    found_in_model: bool = False  # targets and roles were read from the loaded model


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        MODELS[key] = spec
    return spec


register_model(ModelSpec(
    name="llama", model_class="LlamaForCausalLM", config_class="LlamaConfig",
    lora_targets=LLAMA_LINEAR, attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_targets=("gate_proj", "up_proj", "down_proj"), mlp_output="down_proj", template="auto",
    hf_model_types=("llama", "mistral"),  # Mistral: the Llama layout
))
register_model(ModelSpec(
    name="internlm", model_class="LlamaForCausalLM", config_class="LlamaConfig",
    lora_targets=LLAMA_LINEAR, attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_targets=("gate_proj", "up_proj", "down_proj"), mlp_output="down_proj", template="internlm",
    # Only InternLM 1 checkpoints converted to the Llama layout load with LlamaForCausalLM.
    remote_code_note="the official InternLM 1 checkpoints (internlm/internlm-7b) and InternLM2/3 ship their own "
    "modelling code; InternLM 1 converted to the Llama layout loads natively",
    config_overrides=(("attention_bias", True),), hf_model_types=("internlm",),
))
register_model(ModelSpec(
    name="bloom", model_class="BloomForCausalLM", config_class="BloomConfig",
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    attention_targets=("query_key_value", "dense"), mlp_targets=("dense_h_to_4h", "dense_4h_to_h"),
    mlp_output="dense_4h_to_h", template="alpaca", packing="alibi_blocks", hf_model_types=("bloom",),
))
register_model(ModelSpec(
    name="chatglm", model_class="GlmForCausalLM", config_class="GlmConfig",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"), mlp_targets=("gate_up_proj", "down_proj"),
    mlp_output="down_proj", template="auto",
    remote_code_note="ChatGLM-6B/2/3 checkpoints ship their own modelling code", aliases=("glm",),
    hf_model_types=("glm", "glm4", "chatglm"),
))
register_model(ModelSpec(
    name="moss", model_class="CodeGenForCausalLM", config_class="CodeGenConfig",
    lora_targets=("qkv_proj", "out_proj", "fc_in", "fc_out"), attention_targets=("qkv_proj", "out_proj"),
    mlp_targets=("fc_in", "fc_out"), mlp_output="fc_out", template="moss",
    remote_code_note="MOSS checkpoints ship their own modelling code", hf_model_types=("codegen", "moss"),
))
register_model(ModelSpec(
    name="qwen2", model_class="Qwen2ForCausalLM", config_class="Qwen2Config",
    lora_targets=LLAMA_LINEAR, attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_targets=("gate_proj", "up_proj", "down_proj"), mlp_output="down_proj", template="auto",
    aliases=("qwen",), hf_model_types=("qwen2", "qwen"),
))


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UniftError(f"unknown --model_type {name!r}; known: {', '.join(sorted(MODELS))}") from None


def family_of_hf_type(hf_type: str | None) -> ModelSpec | None:
    """The family whose checkpoints carry this transformers config.model_type; None for one unift has no
    family for."""
    return next((spec for spec in MODELS.values() if hf_type and hf_type in spec.hf_model_types), None)
