"""Adapter targets for checkpoints whose module names differ from their family's native class.

A family's defaults name the native transformers modules (GLM-4: q_proj ... down_proj). Checkpoints that
ship their own modelling code use other names (ChatGLM-6B/2/3: query_key_value, dense, dense_h_to_4h,
dense_4h_to_h; InternLM2: wqkv, wo, w1-w3; Baichuan: W_pack). Where the defaults match nothing, the
targets are found in the loaded model: every linear layer except the output head, each given a role
(attention or MLP) from the block it sits in, so placements that need roles (bottleneck adapters, IA3)
follow the same layers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from unift.errors import UniftError
from unift.models.registry import ModelSpec

log = logging.getLogger("unift")

ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


def _is_linear(module: Any) -> bool:
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2-style Conv1D does not
    return type(module).__name__ == "Conv1D"


def linear_layers(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every linear layer inside the blocks, the output head left out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if not _is_linear(module) or module is head or name.rsplit(".", 1)[-1] in ("lm_head", "output_layer"):
            continue
        if any(part in ("lora_A", "lora_B", "base_layer") for part in name.split(".")):
            continue  # already wrapped
        found.append((name, module))
    return found


def _matches(names: list[str], targets: tuple[str, ...]) -> bool:
    return any(name.rsplit(".", 1)[-1] in targets for name in names)


def _role(qualified: str) -> str:
    parents = [p.lower() for p in qualified.split(".")[:-1]]
    if any(w in p for p in parents for w in ATTENTION_WORDS):
        return "attention"
    if any(w in p for p in parents for w in MLP_WORDS):
        return "mlp"
    return ""


def _width(module: Any, attr: str) -> int | None:
    value = getattr(module, attr, None)
    if value is None and type(module).__name__ == "Conv1D":  # Conv1D: weight is [in, out]
        value = module.weight.shape[0 if attr == "in_features" else 1]
    return value


def spec_from_model(spec: ModelSpec, model: Any) -> ModelSpec:
    """The family's spec when its default targets name layers of this model, else a copy whose targets
    (and roles) are the model's own linear layers. Says which layers it chose."""
    layers = linear_layers(model)
    names = [n for n, _ in layers]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    if not names:
        return spec
    if _matches(names, spec.lora_targets):
        missing = [t for t in spec.lora_targets if t not in leaves]
        others = [n for n in leaves if n not in spec.lora_targets]
        if missing and others:  # e.g. Baichuan's fused W_pack where llama has q/k/v_proj
            log.warning("--model_type %s: default targets %s match no layer of this checkpoint, and its layers %s "
                        "are not targeted; name them with --lora_target_modules to adapt them", spec.name,
                        " ".join(missing), " ".join(others))
        return spec
    roles: dict[str, str] = {}
    modules: dict[str, Any] = {}
    for name, module in layers:
        leaf = name.rsplit(".", 1)[-1]
        roles.setdefault(leaf, _role(name))
        modules.setdefault(leaf, module)
    attention = tuple(n for n in leaves if roles[n] == "attention")
    mlp = tuple(n for n in leaves if roles[n] == "mlp")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    # The MLP output projection maps back to the model width; the attention output is the block's last.
    outputs = [n for n in mlp if _width(modules[n], "out_features") == hidden
               and _width(modules[n], "in_features") != hidden]
    log.info("--model_type %s: its default targets (%s) match no layer of this checkpoint; targeting every "
             "linear layer except the output head: %s", spec.name, " ".join(spec.lora_targets), " ".join(leaves))
    return dataclasses.replace(
        spec, lora_targets=tuple(leaves), attention_targets=attention, mlp_targets=mlp,
        mlp_output=outputs[-1] if outputs else "", attention_output=attention[-1] if len(attention) > 1 else "",
        found_in_model=True,
    )


def require_roles(spec: ModelSpec, method: str, roles: tuple[str, ...]) -> None:
    """A clear error when a placement needs layer roles that were not found in the model."""
    missing = [r for r in roles if not getattr(spec, r)]
    if spec.found_in_model and missing:
        found = " ".join(spec.lora_targets) or "none"
        raise UniftError(
            f"--peft_type {method}: cannot tell the attention and MLP layers of this checkpoint apart (linear "
            f"layers found: {found}); name the layers to adapt with --lora_target_modules"
        )
