"""The --peft_type entries: how each method builds its peft config from the flags and the family's ModelSpec.

Every `build(options, spec)` reads only the flags listed in its MethodSpec.options (plus `total_steps`,
which training adds beside the flags); unift.peft.registry.check_args refuses the others.
"""

from __future__ import annotations

from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec
from unift.peft.bottleneck import attention_inputs, default_targets
from unift.peft.registry import MethodSpec, register_method, target_modules
from unift.peft.targets import require_roles

LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
QUANT_OPTIONS = ("quantization_bit", "load_in_8bit")
PROMPT_NOTE = "no: it adds virtual tokens, not weight changes, so there is nothing to fold into the base"


def _causal_lm() -> Any:
    from peft import TaskType

    return TaskType.CAUSAL_LM


# ---- the LoRA family --------------------------------------------------------------------------------

def _lora_config(options: Any, spec: ModelSpec, **extra: Any):
    from peft import LoraConfig

    return LoraConfig(
        task_type=_causal_lm(),
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules(options, spec),
        **extra,
    )


def _dora_config(options: Any, spec: ModelSpec):
    return _lora_config(options, spec, use_dora=True)


def _dora_validate(args: Any) -> None:
    import torch

    if args.quantization_bit == 8 and not torch.cuda.is_available():
        # Seen with peft 0.21.2 + bitsandbytes 0.50.2: the first step after DoRA's weight-norm pass fails in
        # the 8-bit matmul (its scale statistics are gone). 4-bit works.
        raise UniftError("--peft_type dora over an 8-bit base fails on CPU (bitsandbytes loses the 8-bit "
                         "scales in DoRA's weight-norm pass); use --quantization_bit 4 or --peft_type lora")


register_method(MethodSpec(
    name="lora", build=_lora_config, options=(*LORA_OPTIONS, *QUANT_OPTIONS), quantization_bits=(4, 8),
    description="low-rank adapters on the linear layers (optionally over an 8- or 4-bit base)",
))
register_method(MethodSpec(
    name="dora", build=_dora_config, options=(*LORA_OPTIONS, *QUANT_OPTIONS), quantization_bits=(4, 8),
    validate=_dora_validate, quantization_note="4-bit; 8-bit on GPU only",
    description="LoRA with weight decomposition (magnitude + direction)",
))
register_method(MethodSpec(
    name="qlora", build=_lora_config, options=(*LORA_OPTIONS, "compute_dtype"), quantization_bit=4,
    gpu_optim="paged_adamw_32bit",
    description="LoRA over a 4-bit nf4 base (double quantization, --compute_dtype; paged AdamW on GPU)",
))


def adalora_schedule(options: Any) -> tuple[int, int, int, int]:
    """(total_step, tinit, tfinal, deltaT): unset flags scale with the run (10% warm-up without pruning,
    the last 20% at the final budget, a reallocation every 1% of the steps)."""
    total = getattr(options, "total_steps", None)
    if not total or total <= 0:
        raise UniftError("--peft_type adalora needs the number of optimizer steps (total_steps) to schedule "
                         "its rank budget")
    tinit = options.adalora_tinit if options.adalora_tinit is not None else total // 10
    tfinal = options.adalora_tfinal if options.adalora_tfinal is not None else max(1, total // 5)
    delta = options.adalora_delta_t if options.adalora_delta_t is not None else max(1, total // 100)
    if tinit + tfinal >= total:
        raise UniftError(
            f"--adalora_tinit {tinit} + --adalora_tfinal {tfinal} leave no budget-allocation steps in a run of "
            f"{total} optimizer steps; lower them or train longer"
        )
    if options.adalora_init_r < options.lora_r:
        raise UniftError(f"--adalora_init_r {options.adalora_init_r} is below the target rank --lora_r "
                         f"{options.lora_r}: AdaLoRA prunes from the initial rank down to the target")
    return total, tinit, tfinal, delta


def _adalora_config(options: Any, spec: ModelSpec):
    from peft import AdaLoraConfig

    total, tinit, tfinal, delta = adalora_schedule(options)
    return AdaLoraConfig(
        task_type=_causal_lm(), init_r=options.adalora_init_r, target_r=options.lora_r, tinit=tinit,
        tfinal=tfinal, deltaT=delta, beta1=0.85, beta2=0.85, lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout, target_modules=target_modules(options, spec), total_step=total,
    )


def _adalora_update(model: Any, global_step: int) -> None:
    """Reallocate the rank budget: needs this step's gradients, so it runs after optimizer.step() and
    before zero_grad() (a TrainerCallback runs after zero_grad, when the sensitivities are gone)."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    model.base_model.update_and_allocate(global_step)


register_method(MethodSpec(
    name="adalora", build=_adalora_config, after_optimizer_step=_adalora_update, quantization_bits=(4, 8),
    options=(*LORA_OPTIONS, "adalora_init_r", "adalora_tinit", "adalora_tfinal", "adalora_delta_t",
             *QUANT_OPTIONS),
    description="LoRA whose rank budget is reallocated across layers during training (--lora_r = target rank)",
))


# ---- prompt learning ----------------------------------------------------------------------------------

def _prefix_config(options: Any, spec: ModelSpec):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=_causal_lm(), num_virtual_tokens=options.num_virtual_tokens)


def _ptuning_config(options: Any, spec: ModelSpec):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type=_causal_lm(), num_virtual_tokens=options.num_virtual_tokens,
                               encoder_hidden_size=options.prompt_encoder_hidden_size)


def _prompt_config(options: Any, spec: ModelSpec):
    from peft import PromptTuningConfig, PromptTuningInit

    text = getattr(options, "prompt_init_text", None)
    if not text:
        return PromptTuningConfig(task_type=_causal_lm(), num_virtual_tokens=options.num_virtual_tokens)
    from unift.models.loading import resolve_model_path

    # Starting from the embeddings of a task description trains faster than random virtual tokens.
    return PromptTuningConfig(
        task_type=_causal_lm(), num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=text,
        tokenizer_name_or_path=resolve_model_path(getattr(options, "model_name_or_path", None)),
    )


register_method(MethodSpec(
    name="prefix", build=_prefix_config, options=("num_virtual_tokens",), prompt_learning=True,
    mergeable=False, merge_note=PROMPT_NOTE, aliases=("prefix_tuning",),
    description="trained key/value prefixes in every attention layer",
))
register_method(MethodSpec(
    name="p-tuning", build=_ptuning_config, options=("num_virtual_tokens", "prompt_encoder_hidden_size"),
    prompt_learning=True, mergeable=False, merge_note=PROMPT_NOTE, aliases=("ptuning", "p_tuning"),
    description="virtual tokens produced by a small prompt encoder (MLP)",
))
register_method(MethodSpec(
    name="prompt", build=_prompt_config, options=("num_virtual_tokens", "prompt_init_text"),
    prompt_learning=True, mergeable=False, merge_note=PROMPT_NOTE, aliases=("prompt_tuning",),
    description="trained soft-prompt embeddings before the input",
))


# ---- other adapters on linear layers --------------------------------------------------------------

KEY_VALUE = ("k_proj", "v_proj")


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
    return IA3Config(task_type=_causal_lm(), target_modules=targets, feedforward_modules=feedforward)


def _loha_config(options: Any, spec: ModelSpec):
    from peft import LoHaConfig

    return LoHaConfig(task_type=_causal_lm(), r=options.lora_r, alpha=options.lora_alpha,
                      target_modules=target_modules(options, spec))


def _lokr_config(options: Any, spec: ModelSpec):
    from peft import LoKrConfig

    return LoKrConfig(task_type=_causal_lm(), r=options.lora_r, alpha=options.lora_alpha,
                      target_modules=target_modules(options, spec))


def _oft_config(options: Any, spec: ModelSpec):
    from peft import OFTConfig

    # r=0 and a block size: the block size must divide every targeted layer's input width.
    return OFTConfig(task_type=_causal_lm(), r=0, oft_block_size=options.oft_block_size,
                     target_modules=target_modules(options, spec))


def _vera_config(options: Any, spec: ModelSpec):
    from peft import VeraConfig

    return VeraConfig(task_type=_causal_lm(), r=options.vera_r, vera_dropout=options.lora_dropout,
                      target_modules=target_modules(options, spec))


register_method(MethodSpec(
    name="ia3", build=_ia3_config, options=("lora_target_modules", *QUANT_OPTIONS), quantization_bits=(4, 8),
    description="learned rescaling vectors on keys, values and the MLP (IA3)",
))
register_method(MethodSpec(
    name="loha", build=_loha_config, options=("lora_r", "lora_alpha", "lora_target_modules"),
    description="low-rank Hadamard product adapters (LyCORIS LoHa)",
))
register_method(MethodSpec(
    name="lokr", build=_lokr_config, options=("lora_r", "lora_alpha", "lora_target_modules"),
    description="low-rank Kronecker product adapters (LyCORIS LoKr)",
))
register_method(MethodSpec(
    name="oft", build=_oft_config, options=("oft_block_size", "lora_target_modules"),
    description="orthogonal fine-tuning: block-diagonal rotations of the weights",
))
register_method(MethodSpec(
    name="vera", build=_vera_config, options=("vera_r", "lora_dropout", "lora_target_modules"),
    description="shared random low-rank matrices with trained scaling vectors (VeRA)",
))


# ---- bottleneck adapters (our plugin) -----------------------------------------------------------------

PLACEMENT_ROLES = {"houlsby": ("mlp_targets",), "pfeiffer": ("mlp_output",), "parallel": ("attention_targets",)}


def _adapters_config(options: Any, spec: ModelSpec):
    from unift.peft.bottleneck import BottleneckConfig

    if not options.lora_target_modules:
        require_roles(spec, f"adapters --adapter_type {options.adapter_type}",
                      PLACEMENT_ROLES.get(options.adapter_type, ()))
    try:
        return BottleneckConfig(
            task_type=_causal_lm(),
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
    name="adapters", build=_adapters_config, aliases=("bottleneck",),
    options=("adapter_type", "bottleneck_size", "non_linearity", "adapter_dropout", "adapter_scaling",
             "adapter_init", "lora_target_modules"),
    merge_check=_adapters_merge_check,
    merge_note="only with --non_linearity linear (a non-linearity has no equivalent weight)",
    description="bottleneck adapters: houlsby (MLP, sequential), pfeiffer (MLP output), parallel (attention)",
))
