"""Freeze tuning (partial-parameter fine-tuning, as LLaMA-Factory's `freeze`): only some decoder layers
train, the rest of the model stays frozen. `--freeze_trainable_layers N`: the last N layers (a negative N:
the first |N|); `--freeze_trainable_modules`: which modules of those layers (name parts such as mlp,
self_attn; default all); `--freeze_extra_modules`: modules outside the layers that train too (such as
embed_tokens, lm_head, norm). Like full tuning, the run folder holds the whole trained model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec
from unift.options import Range, opt
from unift.peft.registry import MethodSpec, register_method


@dataclass
class FreezeFlags:
    freeze_trainable_layers: int = opt(2, "freeze: train the last N decoder layers (a negative N: the first |N|)",
                                       group="freeze", range=Range(exclude=(0,)))
    freeze_trainable_modules: list[str] = opt(["all"], "freeze: modules of those layers that train, by name "
                                              "part (e.g. mlp self_attn, or q_proj); all: every one",
                                              group="freeze", nargs="+")
    freeze_extra_modules: list[str] | None = opt(None, "freeze: modules outside the layers that train too "
                                                 "(e.g. embed_tokens lm_head norm)", group="freeze", nargs="+")


def _names(value: Any) -> list[str]:
    """A list flag, also given comma-separated (`mlp,self_attn`) as LLaMA-Factory spells it."""
    items = [value] if isinstance(value, str) else list(value or [])
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def decoder_layers(model: Any) -> tuple[str, int]:
    """(qualified name, count) of the model's stack of decoder layers: its longest ModuleList (model.layers,
    transformer.h, transformer.encoder.layers...), whatever the family calls it."""
    from torch import nn

    found = [(name, len(module)) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not found:
        raise UniftError(f"--peft_type freeze: {type(model).__name__} has no list of decoder layers")
    return max(found, key=lambda item: item[1])


def _matches(parts: list[str], wanted: list[str]) -> str | None:
    return next((w for w in wanted if w in parts), None)


def train_some_layers(model: Any, options: Any, spec: ModelSpec) -> Any:
    """Freeze everything, then unfreeze the chosen modules of the chosen layers and the extra modules. A
    name part that matches nothing is an error naming what is there, not a run that trains less than asked."""
    stack, count = decoder_layers(model)
    n = options.freeze_trainable_layers
    if abs(n) > count:
        raise UniftError(f"--freeze_trainable_layers {n}: the model has {count} decoder layers")
    chosen = set(range(count - n, count)) if n > 0 else set(range(-n))
    modules = _names(options.freeze_trainable_modules)
    every = modules in ([], ["all"])
    extra = _names(options.freeze_extra_modules)
    used: set[str] = set()
    inner_names: set[str] = set()
    outer_names: set[str] = set()
    prefix = f"{stack}."
    model.requires_grad_(False)
    # Tied weights under each name (lm_head is embed_tokens in many small models): either name trains it.
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            parts = rest.split(".")[:-1]  # module names, the parameter's own name left out
            inner_names.update(parts)
            hit = "all" if every else _matches(parts, modules)
            if int(index) in chosen and hit:
                param.requires_grad_(True)
                used.add(hit)
        else:
            parts = name.split(".")[:-1]
            outer_names.update(parts)
            hit = _matches(parts, extra)
            if hit:
                param.requires_grad_(True)
                used.add(hit)
    for flag, wanted, there in (("--freeze_trainable_modules", [] if every else modules, inner_names),
                                ("--freeze_extra_modules", extra, outer_names)):
        missing = [w for w in wanted if w not in used]
        if missing:
            raise UniftError(f"{flag}: {', '.join(missing)} matches no module; "
                             f"{'the layers hold' if flag.endswith('trainable_modules') else 'outside the layers are'}"
                             f" {', '.join(sorted(there - {stack, *stack.split('.')}))}")
    if getattr(options, "gradient_checkpointing", False):
        # The frozen embeddings give the checkpointed layers inputs without grad, which would leave the
        # trained layers without gradients under reentrant checkpointing.
        model.enable_input_require_grads()
    return model


register_method(MethodSpec(
    name="freeze", build=None, own_weights=train_some_layers, flags=FreezeFlags, order=91, mergeable=False,
    merge_note="nothing to fold: the run folder is the whole model (`unift merge` copies it)",
    description="only the last (or first) N decoder layers, or some of their modules (the run folder holds "
                "the trained model)",
))
