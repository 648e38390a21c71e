"""One MethodSpec per --peft_type. Adding a method is one file under unift/peft/methods/ and one test.

The registry knows nothing of argparse or the Trainer: a method's `flags` is a dataclass of the options it
reads (their flags are generated from its fields); `build` takes a plain options object with those
attributes (normally the training arguments) and the family's ModelSpec and returns the peft config.
A method that trains the model's own weights (full, freeze) has no peft config: its `own_weights` marks
what trains on the plain model instead, and its run folder then holds the whole trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec, get_model_spec

# Flags that load the base quantized: general flags, read by the methods that declare quantization_bits.
QUANTIZATION_FLAGS = ("quantization_bit", "load_in_8bit")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[Any, ModelSpec], Any] | None  # (options, model spec) -> peft config; None with own_weights
    description: str
    flags: type | None = None  # dataclass of the method's own flags (opt() fields); None: it reads none
    reads: tuple[str, ...] = ()  # general flags it documents among its own (qlora: compute_dtype)
    order: int = 100  # place in listings (the support table, --help)
    aliases: tuple[str, ...] = ()
    quantization_bit: int | None = None  # qlora loads the base in 4-bit
    mergeable: bool = True
    merge_note: str = ""  # why it cannot be merged, when it cannot
    # Its merge adds a delta to the weights (LoRA-like), so unmerging subtracts it again exactly up to fp32
    # rounding; multiplicative merges (IA3, OFT, DoRA's magnitude) drift a little with every undo.
    additive_merge: bool = False
    unsupported: dict[str, str] = field(default_factory=dict)  # model_type -> reason
    # Called after optimizer.step() and before zero_grad() with (peft_model, global_step), e.g. AdaLoRA.
    after_optimizer_step: Callable[[Any, int], None] | None = None
    quantization_bits: tuple[int, ...] = ()  # base widths it trains over (--quantization_bit / --load_in_8bit)
    quantization_note: str = ""  # a limit on those widths worth showing in the support table
    prompt_learning: bool = False  # virtual tokens instead of wrapped layers (prefix, p-tuning, prompt)
    # It trains 2-D weight matrices (--optim muon steps those): not IA3's or VeRA's scaling vectors, not a
    # prefix or soft prompt (embeddings)
    trains_matrices: bool = True
    # Optimizer for transformers' TrainingArguments.optim when a GPU is present (QLoRA: paged AdamW).
    gpu_optim: str | None = None
    # Why merging may be refused for some settings, checked on the adapter config (e.g. a non-linearity).
    merge_check: Callable[[Any], str] | None = None
    # Extra parse-time checks of the arguments (raise UniftError), after the generic ones.
    validate: Callable[[Any], None] | None = None
    # (model, options, model spec) -> the model with requires_grad set on the weights it trains: the method
    # trains the model itself (no adapter), and the run folder holds the whole trained model.
    own_weights: Callable[[Any, Any, ModelSpec], Any] | None = None

    @property
    def holds_model(self) -> bool:
        """Its run folder holds the whole trained model, not an adapter over a base."""
        return self.own_weights is not None

    @property
    def options(self) -> tuple[str, ...]:
        """The flags this method reads: its own, the quantization flags if it trains over a quantized base,
        and the general ones it documents."""
        own = tuple(f.name for f in dataclasses.fields(self.flags)) if self.flags else ()
        return own + (QUANTIZATION_FLAGS if self.quantization_bits else ()) + self.reads

    def check_model_type(self, model_type: str) -> None:
        reason = self.unsupported.get(model_type)
        if reason:
            raise UniftError(f"--peft_type {self.name} does not work with --model_type {model_type}: {reason}")

    def optimizer_name(self) -> str:
        """transformers' `optim` for this method: the method's GPU optimizer (QLoRA: paged AdamW, which
        needs CUDA; bitsandbytes falls back with a warning on CPU) where it applies, else transformers'
        own default."""
        import torch
        from transformers import TrainingArguments

        default = str(TrainingArguments.__dataclass_fields__["optim"].default)
        if self.gpu_optim and torch.cuda.is_available():
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                return default
            return self.gpu_optim
        return default


METHODS: dict[str, MethodSpec] = {}
REWARD_HEADS = ("score", "classifier")  # transformers' names of a sequence-classification head


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


def method_names() -> list[str]:
    """Canonical names in listing order (aliases left out)."""
    unique = {m.name: m for m in METHODS.values()}
    return sorted(unique, key=lambda name: unique[name].order)


def method_flag_fields() -> list[dataclasses.Field]:
    """Every method's flag fields, once each, in listing order: the union `unift train` offers. A flag
    read by several methods must be defined alike everywhere (unift.peft.flags makes the shared ones)."""
    found: dict[str, dataclasses.Field] = {}
    for name in method_names():
        flags = METHODS[name].flags
        for f in dataclasses.fields(flags) if flags else ():
            seen = found.setdefault(f.name, f)
            if seen is not f and (seen.default, seen.type, dict(seen.metadata)) != (f.default, f.type, dict(f.metadata)):
                raise TypeError(f"--{f.name} is defined differently by two PEFT methods ({name} and another); "
                                "make it once in unift/peft/flags.py")
    return list(found.values())


def causal_lm() -> Any:
    from peft import TaskType

    return TaskType.CAUSAL_LM


def target_modules(options: Any, spec: ModelSpec, default: tuple[str, ...] | None = None) -> list[str]:
    """--lora_target_modules (alias --target_modules) when given, else the method's default for the family
    (every linear layer of the family's blocks unless the method says otherwise)."""
    given = getattr(options, "lora_target_modules", None)
    if given:
        return list(given)
    return list(spec.lora_targets if default is None else default)


def check_args(args: Any) -> None:
    """Cross-field checks between the model family, the method and the method's flags, run when the
    arguments are built (so `unift train` refuses before loading anything).

    - an unsupported model_type x peft_type pair is an error with the reason;
    - a method-specific flag set away from its default for a method that ignores it is an error that names
      the flags the method does read;
    - --load_in_8bit is normalised into --quantization_bit 8; quantized loading only for methods that take it.
    """
    method = get_method(args.peft_type)
    spec = get_model_spec(args.model_type)
    method.check_model_type(spec.name)
    args.peft_type, args.model_type = method.name, spec.name  # aliases (ptuning, glm) -> canonical names
    own = set(method.options)
    ignored = []
    for f in method_flag_fields():
        if f.name not in own and getattr(args, f.name) != (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
            ignored.append(f"--{f.name}")
    if ignored:
        reads = ", ".join(f"--{o}" for o in method.options if o not in method.reads) or "no method flags"
        raise UniftError(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by --peft_type {method.name} "
            f"(it reads {reads}); remove {'it' if len(ignored) == 1 else 'them'} or pick the method they belong to"
        )
    load_in_8bit = bool(getattr(args, "load_in_8bit", False))
    bits = getattr(args, "quantization_bit", None)
    if load_in_8bit:
        if bits not in (None, 8):
            raise UniftError(f"--load_in_8bit contradicts --quantization_bit {bits}")
        bits = 8
    if bits is not None and method.holds_model:
        raise UniftError(f"--peft_type {method.name} trains the model's own weights, and {bits}-bit weights "
                         "cannot be trained directly (they have no gradients); drop --quantization_bit/"
                         "--load_in_8bit, or train an adapter over the quantized base (--peft_type qlora)")
    if method.quantization_bit:
        if bits not in (None, method.quantization_bit):
            raise UniftError(
                f"--peft_type {method.name} loads the base in {method.quantization_bit}-bit; for an {bits}-bit "
                "base use --peft_type lora --load_in_8bit"
            )
        bits = method.quantization_bit
    elif bits is not None and bits not in method.quantization_bits:
        able = [m for m in method_names() if bits in METHODS[m].quantization_bits]
        raise UniftError(f"--peft_type {method.name} does not train over a {bits}-bit base; "
                         f"{bits}-bit loading works with --peft_type {', '.join(able)}")
    if bits is not None:
        args.quantization_bit = bits
    if method.validate is not None:
        method.validate(args)


def wrap_model(model: Any, method: MethodSpec, options: Any, spec: ModelSpec, reward: bool = False,
               adapter_dir: str | None = None):
    """Wrap a loaded base model with the method's adapter and return the PeftModel; a method that trains
    the model itself returns the model with its trained weights marked. `reward`: the model has a new
    scoring head (--stage rm), which trains whole beside the adapter. `adapter_dir`: a saved adapter that
    trains further, instead of a new one."""
    from peft import TaskType, get_peft_model, prepare_model_for_kbit_training

    method.check_model_type(spec.name)
    if method.own_weights is not None:
        model = method.own_weights(model, options, spec)
        if reward:
            for name, param in model.named_parameters():
                if name.split(".")[0] in REWARD_HEADS:
                    param.requires_grad_(True)
        return model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts norms/head to fp32 and enables input grads; checkpointing stays the user's choice.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(getattr(options, "gradient_checkpointing", False))
        )
    if adapter_dir:
        return load_adapter(model, adapter_dir, trainable=True)
    if not method.prompt_learning and not getattr(options, "lora_target_modules", None):
        from unift.peft.targets import spec_from_model

        spec = spec_from_model(spec, model)  # the family's names, or the checkpoint's own linear layers
    config = method.build(options, spec)
    if reward:  # peft then saves the scoring head (modules_to_save) with the adapter
        config.task_type = TaskType.SEQ_CLS
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        raise UniftError(f"--peft_type {method.name} on {spec.name}: {str(err).splitlines()[0]}") from err
    from unift import compat

    compat.apply()
    return wrapped


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of a PeftModel (peft's count, which counts 4-bit weights unpacked) or
    of a plain model (full, freeze)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_refusal(method: MethodSpec, peft_config: Any) -> str:
    """'' when an adapter of this method with this config can be folded into the base weights, else why not."""
    if not method.mergeable:
        return method.merge_note or f"--peft_type {method.name} cannot be merged"
    if method.merge_check is not None:
        return method.merge_check(peft_config)
    return ""


def load_adapter(model: Any, adapter_dir: str, trainable: bool = False):
    """PeftModel.from_pretrained, with the adapter's weights exactly as saved (peft rounds them to a
    half-precision base's dtype: unift.compat.peft_adapters); `trainable`: to train it further."""
    from peft import PeftModel

    from unift import compat

    compat.apply()
    try:
        with compat.peft_adapters.quiet_adalora_rank_pattern(model, adapter_dir):
            wrapped = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UniftError(f"cannot load the adapter in {adapter_dir}: {str(err).splitlines()[0]}") from err
    compat.peft_adapters.reload_saved_weights(wrapped, adapter_dir)
    return wrapped
