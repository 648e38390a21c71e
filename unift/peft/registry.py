"""One MethodSpec per --peft_type. Adding a method is one entry (or one plugin file) and one test.

The registry knows nothing of argparse or the Trainer: `build` takes a plain options object (any object
with the attributes the method reads, normally unift.args.TrainArgs) and the family's ModelSpec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[Any, ModelSpec], Any]  # (options, model spec) -> peft config
    description: str
    aliases: tuple[str, ...] = ()
    quantization_bit: int | None = None  # qlora loads the base in 4-bit
    mergeable: bool = True
    merge_note: str = ""  # why it cannot be merged, when it cannot
    options: tuple[str, ...] = ()  # the flags this method reads (others given for it draw a warning)
    unsupported: dict[str, str] = field(default_factory=dict)  # model_type -> reason
    # Called after optimizer.step() and before zero_grad() with (peft_model, global_step), e.g. AdaLoRA.
    after_optimizer_step: Callable[[Any, int], None] | None = None

    def check_model_type(self, model_type: str) -> None:
        reason = self.unsupported.get(model_type)
        if reason:
            raise UniftError(f"--peft_type {self.name} does not work with --model_type {model_type}: {reason}")


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    for key in (spec.name, *spec.aliases):
        METHODS[key] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        names = sorted({m.name for m in METHODS.values()})
        raise UniftError(f"unknown --peft_type {name!r}; known: {', '.join(names)}") from None


def target_modules(options: Any, spec: ModelSpec) -> list[str]:
    """--lora_target_modules when given, else every linear layer of the family's blocks."""
    given = getattr(options, "lora_target_modules", None)
    if given:
        return list(given)
    return list(spec.lora_targets)


LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _lora_config(options: Any, spec: ModelSpec, **extra: Any):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules(options, spec),
        **extra,
    )


register_method(MethodSpec(
    name="lora", build=_lora_config, options=LORA_OPTIONS,
    description="low-rank adapters on the linear layers",
))
register_method(MethodSpec(
    name="qlora", build=_lora_config, options=(*LORA_OPTIONS, "compute_dtype"), quantization_bit=4,
    description="LoRA over a 4-bit nf4 base (double quantization; bitsandbytes)",
))


def wrap_model(model: Any, method: MethodSpec, options: Any, spec: ModelSpec):
    """Wrap a loaded base model with the method's adapter and return the PeftModel."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    method.check_model_type(spec.name)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts norms/head to fp32 and enables input grads; checkpointing stays the user's choice.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(getattr(options, "gradient_checkpointing", False))
        )
    config = method.build(options, spec)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UniftError(f"--peft_type {method.name} on {spec.name}: {str(err).splitlines()[0]}") from err
