"""merged_sampling: --stage grpo samples a LoRA policy from a merged copy of it.

Sampling a LoRA policy token by token pays for the adapter on every projection of every decode step: two
small matmuls, casts and an addition, 210 times per token on a 30-layer model (measured on the embedded
model, 16 completions of 46 tokens: 4.4 s for the base alone, 6.7 s with a rank-16 adapter). A plain copy
of the model whose projections hold base + adapter samples at the base's speed. It is refreshed before each
generation from the policy's current weights (one fused add per projection, computed in fp32 and stored
in the base's dtype, as a bf16 merge is stored), the way TRL refreshes vLLM's weights on a GPU. The
log-probabilities the loss uses are still the policy's own forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch


def _lora_linears(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_sampling_refusal(model: Any) -> str | None:
    """Why the policy cannot be sampled from a merged copy, or None when it can: a PEFT model whose only
    trained weights are plain LoRA matrices on full-precision linear layers."""
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(model, PeftModel):
        return "the policy is not a PEFT adapter model"
    layers = _lora_linears(model)
    if not layers:
        return "the adapter has no LoRA layers"
    adapter = model.active_adapter
    for _, layer in layers:
        if type(layer) is not LoraLinear or not isinstance(layer.base_layer, torch.nn.Linear):
            return f"{type(layer).__name__} layers (a quantized base or a non-linear target) cannot be merged here"
        if layer.use_dora.get(adapter, False):
            return "DoRA's magnitude is not a plain weight update"
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trained or any(".lora_A." not in n and ".lora_B." not in n for n in trained):
        return "weights outside the LoRA matrices train too"
    return None


class MergedSampler:
    """Stands in for a LoRA PeftModel's generate(): the same call, answered by a merged copy."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.copy: torch.nn.Module | None = None  # built at the first generation: only GRPO ever asks
        self.pairs: list[tuple[Any, torch.nn.Linear]] = []
        self.calls = 0

    def _build(self) -> None:
        clone = copy.deepcopy(self.model)
        for module in clone.modules():
            # forwards patched onto instances (unift's levers, TRL's fused output head, accelerate's
            # autocast) are closures over the policy's own modules: deep copies would call the policy
            module.__dict__.pop("forward", None)
        plain = clone.merge_and_unload()
        plain.eval().requires_grad_(False)
        # training turned the policy's cache off (TRL turns it back on around its own generate call only)
        plain.config.use_cache = plain.generation_config.use_cache = True
        prefix = "base_model.model."
        self.pairs = [(layer, plain.get_submodule(name.removeprefix(prefix))) for name, layer in _lora_linears(self.model)]
        self.copy = plain

    @torch.no_grad()
    def refresh(self) -> None:
        """The copy's projections := the policy's base + its active adapter's update, now."""
        if self.copy is None:
            self._build()
        adapter = self.model.active_adapter
        with torch.autocast(self.pairs[0][1].weight.device.type, enabled=False):
            for layer, target in self.pairs:
                merged = layer.base_layer.weight.float() + layer.get_delta_weight(adapter).float()
                target.weight.copy_(merged)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.refresh()
        self.calls += 1
        return self.copy.generate(*args, **kwargs)


def use_merged_sampling(model: Any) -> tuple[str | None, Callable[[], None]]:
    """Let `model.generate` sample from a merged copy: (None, undo) where it does, else (why not, no-op)."""
    why = merged_sampling_refusal(model)
    if why is not None:
        return why, lambda: None
    model.generate = MergedSampler(model)
    return None, lambda: model.__dict__.pop("generate", None)
