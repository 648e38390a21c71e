"""What makes unift's training fast and lean, each piece measured in docs/performance.md.

- base_dtype:    the frozen base in the compute dtype (bf16 where the CPU or GPU runs it natively), the
                 trained adapter weights in fp32; the base is no longer re-cast on every step.
- bf16_storage:  under fp32 compute, frozen projections whose weights are bf16 values kept in bf16 and
                 widened at use: exact, half their memory (unift.accel.storage).
- padding_free:  each batch as one row without pad tokens (unift.accel.packing).
- label_loss:    the vocabulary projection and loss only where labels are (unift.accel.loss).
- fused_lora:    LoRA's dropout, two matmuls, scaling and addition as one autograd function, without
                 the per-projection copies of the input (unift.accel.lora).
- fast_dropout:  dropout masks drawn in a fraction of torch's CPU time (unift.accel.dropout).
- lean_layers:   RMSNorm and gated-MLP backward passes that keep less (unift.accel.layers).
- cpu_attention: SDPA with an fp32 backward on CPUs, example by example in packed rows
                 (unift.accel.attention).
- merged_sampling: --stage grpo samples a LoRA policy from a merged copy of it (unift.accel.sampling).
`--optimizations` picks them (default: all); each one also steps aside by itself where it does not
apply, and says why once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unift.errors import UniftError
from unift.models.dtypes import dtype_name

# Batch lengths are rounded up to a multiple of this: oneDNN compiles a matmul kernel for every new
# shape on a CPU (~9 ms each, measured), GPUs' tensor cores prefer multiples of 8.
SHAPE_MULTIPLE = {"cpu": 32, "cuda": 8}

OPTIMIZATIONS = ("base_dtype", "bf16_storage", "padding_free", "label_loss", "fused_lora", "fast_dropout", "lean_layers",
                 "cpu_attention", "merged_sampling")


def parse_optimizations(value: str | list[str] | None) -> tuple[str, ...]:
    """'all' (default), 'none', or a comma-separated subset of OPTIMIZATIONS."""
    if value is None:
        return OPTIMIZATIONS
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [v.strip() for v in items if v.strip()]
    if names == ["all"]:
        return OPTIMIZATIONS
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in OPTIMIZATIONS]
    if unknown:
        raise UniftError(f"--optimizations: unknown {', '.join(unknown)}; choose all, none or from "
                         f"{', '.join(OPTIMIZATIONS)}")
    return tuple(n for n in OPTIMIZATIONS if n in names)


@dataclass
class Acceleration:
    """What was applied to one training run, why anything asked for was not, and how to undo it all."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    padding_free: bool = False
    shape_multiple: int = 1  # batches are padded to a multiple of this many tokens
    undo: list[Callable[[], None]] = field(default_factory=list)

    def summary(self) -> str:
        text = ", ".join(self.applied) or "none"
        if self.skipped:
            text += "; not applied: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text

    def restore(self) -> None:
        """Give the model back as PEFT built it (its own forwards, attention and layers): the trained
        model stays usable in memory, for generation or a comparison, exactly like a reloaded one."""
        while self.undo:
            self.undo.pop()()


def prepare_training(peft_model, spec, method, wanted: tuple[str, ...], *, device: str, compute: torch.dtype,
                     padding_free_asked: str = "auto", attention_asked: str | None = None) -> Acceleration:
    """Apply the chosen optimizations to a freshly wrapped PeftModel (or the plain model a method trains
    itself), in place (`restore` undoes them). `attention_asked`: --attn_implementation, which cpu_attention
    leaves as it is."""
    done = Acceleration(shape_multiple=SHAPE_MULTIPLE.get(device, 1))
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    quantized = bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))
    on_cpu = device == "cpu"
    if "base_dtype" in wanted:
        _apply_base_dtype(done, peft_model, inner, quantized)
    if "bf16_storage" in wanted:
        _apply_bf16_storage(done, inner, method, compute, quantized)
    _apply_cpu_layer_levers(done, peft_model, wanted, on_cpu)
    if "lean_layers" in wanted:
        _apply_lean_layers(done, inner, compute)
    _apply_training_forward(done, inner, spec, method, wanted, padding_free_asked)
    if "cpu_attention" in wanted:
        _apply_cpu_attention(done, inner, on_cpu, attention_asked)
    if "merged_sampling" in wanted:  # only --stage grpo asks for it (unift.train.stages.stage_levers)
        _apply_merged_sampling(done, peft_model)
    for name in wanted:  # every lever asked for is either applied or said not to be, with the reason
        if name not in done.skipped and not any(a.split(" ")[0] == name for a in done.applied):
            done.skipped[name] = "nothing in this model for it to act on"
    return done


# Each lever below is applied to the model in place and recorded in `done`: applied, or skipped and why.


def _apply_base_dtype(done: Acceleration, peft_model, inner, quantized: bool) -> None:
    if inner.dtype in (torch.bfloat16, torch.float16) and not quantized:
        done.undo.append(_keep_adapter_inputs(peft_model))
        done.applied.append(f"base_dtype ({dtype_name(inner.dtype)} frozen base)")
    else:
        done.skipped["base_dtype"] = "the base runs in fp32 (fp32 compute or a quantized base)"


def _apply_bf16_storage(done: Acceleration, inner, method, compute: torch.dtype, quantized: bool) -> None:
    from unift.accel.storage import store_frozen_linears_in_bf16

    if compute != torch.float32 or inner.dtype != torch.float32 or quantized:
        done.skipped["bf16_storage"] = "only for an fp32 base under fp32 compute"
    elif getattr(method, "holds_model", False):
        done.skipped["bf16_storage"] = f"--peft_type {method.name} saves the whole model in its checkpoints"
    else:
        count, undo = store_frozen_linears_in_bf16(inner)
        done.undo.append(undo)
        if count:
            done.applied.append(f"bf16_storage ({count} layers)")
        else:
            done.skipped["bf16_storage"] = "no frozen projection holds only bf16 values (not a bf16 checkpoint)"


def _apply_cpu_layer_levers(done: Acceleration, peft_model, wanted: tuple[str, ...], on_cpu: bool) -> None:
    """fused_lora and fast_dropout, in that order."""
    from unift.accel.dropout import use_fast_dropout
    from unift.accel.lora import fuse_lora_layers

    for name, apply, what in (("fused_lora", fuse_lora_layers, "layers"), ("fast_dropout", use_fast_dropout, "layers")):
        if name not in wanted:
            continue
        if not on_cpu:
            done.skipped[name] = "CPU only: on accelerators PEFT's layers and torch's dropout are already fast"
            continue
        count, undo = apply(peft_model)
        done.undo.append(undo)
        if count:
            done.applied.append(f"{name} ({count} {what})")
        else:
            done.skipped[name] = ("no LoRA layer to fuse" if name == "fused_lora"
                                  else "no dropout to replace (dropout 0, or the method has none)")


def _apply_lean_layers(done: Acceleration, inner, compute: torch.dtype) -> None:
    from unift.accel.layers import lean_layers

    count, undo = lean_layers(inner, compute)
    done.undo.append(undo)
    if count:
        done.applied.append(f"lean_layers ({count} modules)")
    else:
        done.skipped["lean_layers"] = f"no RMSNorm or SiLU-gated MLP in {type(inner).__name__} passed the check"


def _apply_training_forward(done: Acceleration, inner, spec, method, wanted: tuple[str, ...],
                            padding_free_asked: str) -> None:
    """padding_free and label_loss, which both work through one TrainingForward installed on the model;
    --padding_free true where it cannot apply is an error."""
    from unift.accel.forward import TrainingForward

    why_not = TrainingForward.supported(inner)
    packing_reason = _padding_free_refusal(spec, method, why_not)
    if padding_free_asked == "true" and packing_reason:
        raise UniftError(f"--padding_free: {packing_reason}")
    padding_free = "padding_free" in wanted and padding_free_asked != "false" and not packing_reason
    if "padding_free" in wanted and packing_reason and padding_free_asked != "false":
        done.skipped["padding_free"] = packing_reason
    elif "padding_free" in wanted and padding_free_asked == "false":
        done.skipped["padding_free"] = "--padding_free false"
    label_loss = "label_loss" in wanted
    if label_loss and why_not:
        done.skipped["label_loss"] = why_not
    if (label_loss or padding_free) and not why_not:
        forward = TrainingForward(inner, spec.packing if padding_free else None, label_only=label_loss)
        forward.install()
        done.undo.append(forward.uninstall)
        if label_loss:
            done.applied.append("label_loss")
    if padding_free:
        done.padding_free = True
        done.applied.append("padding_free")


def _apply_cpu_attention(done: Acceleration, inner, on_cpu: bool, attention_asked: str | None) -> None:
    from unift.accel.attention import register

    if not on_cpu:
        done.skipped["cpu_attention"] = "only CPUs need it"
    elif attention_asked:  # the user's explicit choice is what runs
        done.skipped["cpu_attention"] = f"--attn_implementation {attention_asked} was asked for"
    elif _uses_attention_interface(inner):
        before = inner.config._attn_implementation
        inner.set_attn_implementation(register())
        done.undo.append(lambda: inner.set_attn_implementation(before))
        done.applied.append("cpu_attention")
    else:
        done.skipped["cpu_attention"] = f"{type(inner).__name__} computes attention in its own code"


def _apply_merged_sampling(done: Acceleration, peft_model) -> None:
    from unift.accel.sampling import use_merged_sampling

    why, undo = use_merged_sampling(peft_model)
    done.undo.append(undo)
    if why is None:
        done.applied.append("merged_sampling")
    else:
        done.skipped["merged_sampling"] = why


def _padding_free_refusal(spec, method, forward_refusal: str) -> str:
    if method.prompt_learning:
        return f"--peft_type {method.name} adds virtual tokens to every row, which a packed row cannot carry"
    if not spec.packing:
        return f"--model_type {spec.name} has no way to keep packed examples apart"
    if forward_refusal:
        return f"the training forward cannot be installed: {forward_refusal}"
    return ""


def _uses_attention_interface(model) -> bool:
    impl = getattr(model.config, "_attn_implementation", None)
    return impl in ("sdpa", "eager") and type(model)._can_set_attn_implementation()


def _keep_adapter_inputs(peft_model) -> Callable[[], None]:
    """LoRA layers cast their input to the adapter's fp32 before the adapter matmuls; under autocast
    those matmuls run in the compute dtype anyway, so the fp32 copy (and the fp32 dropout on it) is waste.
    Returns the undo (outside autocast, inference needs the cast)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False

    def undo() -> None:
        for layer in layers:
            layer.cast_input_dtype_enabled = True

    return undo
