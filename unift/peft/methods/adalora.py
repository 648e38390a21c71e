"""AdaLoRA: LoRA whose rank budget is reallocated across layers while training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec
from unift.options import NON_NEGATIVE, POSITIVE_INT, opt
from unift.peft.methods.lora import LoraFlags
from unift.peft.registry import MethodSpec, causal_lm, register_method, target_modules


@dataclass
class AdaLoraFlags(LoraFlags):
    adalora_init_r: int = opt(12, "initial rank of every layer (--lora_r is the average target rank)",
                              group="adalora", range=POSITIVE_INT)
    adalora_tinit: int | None = opt(None, "steps before the budget starts to shrink (default: 10%% of the run)",
                                    group="adalora", range=NON_NEGATIVE)
    adalora_tfinal: int | None = opt(None, "last steps trained at the final budget (default: 20%% of the run)",
                                     group="adalora", range=NON_NEGATIVE)
    adalora_delta_t: int | None = opt(None, "steps between budget reallocations (default: 1%% of the run)",
                                      group="adalora", range=POSITIVE_INT)


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
        task_type=causal_lm(), init_r=options.adalora_init_r, target_r=options.lora_r, tinit=tinit,
        tfinal=tfinal, deltaT=delta, beta1=0.85, beta2=0.85, lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout, target_modules=target_modules(options, spec), total_step=total,
    )


def _adalora_update(model: Any, global_step: int) -> None:
    """Reallocate the rank budget: needs this step's gradients, so it runs after optimizer.step() and
    before zero_grad() (a TrainerCallback runs after zero_grad, when the sensitivities are gone)."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    model.base_model.update_and_allocate(global_step)


register_method(MethodSpec(
    name="adalora", build=_adalora_config, flags=AdaLoraFlags, after_optimizer_step=_adalora_update,
    quantization_bits=(4, 8), order=20, additive_merge=True,
    description="LoRA whose rank budget is reallocated across layers during training (--lora_r = target rank)",
))
