"""The one way a model is loaded: from a base model, a run folder, a foreign PEFT adapter folder or a merged
folder, onto a device, in the dtypes of a DtypePlan (unift.models.dtypes), quantized where the plan says.

Training loads its base through it (no adapter), Generator.load (generate, chat, predict, eval, serve) and
merge load a base and an adapter through it. A run folder whose card says it holds the whole trained model
(--peft_type full, freeze) is loaded as that model, with its card, and no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unift.data import resolve_template
from unift.errors import UniftError
from unift.models import get_model_spec, load_model, load_tokenizer
from unift.models.devices import device_map_for, resolve_device
from unift.models.dtypes import DtypePlan, inference_plan, torch_dtype
from unift.models.hub import is_hub_adapter, resolve_adapter_dir
from unift.models.loading import resolve_model_path, upcast_unquantized
from unift.models.registry import ModelSpec
from unift.models.runcard import RunCard, read_merged_card, tokenizer_folder


@dataclass
class Loaded:
    model: Any  # a PeftModel when an adapter was loaded, else the transformers model
    tokenizer: Any
    template: Any
    card: RunCard | None  # the run's card (inferred for a foreign adapter); None: a base or merged model
    plan: DtypePlan
    spec: ModelSpec
    path: str  # the base (or merged) checkpoint the weights came from
    name: str  # the adapter folder's name, else the checkpoint's
    base_keys: frozenset[str]  # merges: the base's own weight names, before the adapter was put in


def load(
    adapter_dir: str | None = None,
    *,
    base_model: str | None = None,
    model_type: str | None = None,
    template: str | dict | Any | None = None,
    trust_remote_code: bool | None = None,
    device: str | None = None,
    dtype: DtypePlan | str | torch.dtype | None = None,
    card: RunCard | None = None,
    tokenizer: Any = None,
    reward: bool = False,
    allow_reward: bool = False,
    rope_scaling: str | None = None,
    attn_implementation: str | None = None,
) -> Loaded:
    """`adapter_dir`: a run folder or any PEFT adapter folder, local or ORG/NAME[@REVISION] on the hub (its base from `base_model`, else from its card);
    None: `base_model` alone (a base or merged folder, a hub id, or the embedded model when None).
    `dtype`: a DtypePlan, or the --dtype asked for inference (None: the device's, see inference_plan).
    `reward`: load the family's scoring-head model (training --stage rm); `allow_reward`: the caller scores
    with a reward model's run folder (eval), which every other command refuses.
    `card`: the adapter's run card when the caller read it already; `tokenizer` (and a resolved `template`):
    when the caller loaded them already (training does, to check the data before any weights load).
    `rope_scaling`, `attn_implementation`: --rope_scaling ("none": the checkpoint's own) and
    --attn_implementation; None: the run card's (unift.models.overrides)."""
    given = adapter_dir
    adapter_dir = resolve_adapter_dir(adapter_dir)  # ORG/NAME[@REVISION]: its snapshot in the hub cache
    if adapter_dir and card is None:
        card = _foreign_card(adapter_dir, base_model, model_type, template)
    want = _choices(adapter_dir, card, base_model=base_model, model_type=model_type, template=template,
                    trust_remote_code=trust_remote_code, reward=reward, allow_reward=allow_reward,
                    rope_scaling=rope_scaling, attn_implementation=attn_implementation)
    path = resolve_model_path(want.base_model)
    merged = read_merged_card(path)
    if merged and not card:  # a merged folder prompts as its run did
        want.model_type = want.model_type or merged.get("model_type")
        want.template = want.template or merged.get("template")
    spec = get_model_spec(want.model_type or "llama")
    placed_on = resolve_device(device)
    plan = dtype if isinstance(dtype, DtypePlan) else inference_plan(dtype, placed_on, card)
    if tokenizer is None:  # training pads on the right, generation on the left
        tokenizer = load_tokenizer(tokenizer_folder(adapter_dir, path), trust_remote_code=want.trust,
                                   padding_side="right" if plan.purpose == "train" else "left")
    # a name, a template file or a run card's definition is resolved; a template object is used as it is
    chosen = want.template if want.template is not None and not isinstance(want.template, (str, dict)) else \
        resolve_template(want.template, spec.template, tokenizer)
    model = _load_weights(path, spec, plan, placed_on, want, tokenizer)
    # Only merges compare against them (and a quantized base's state dict is costly to build).
    base_keys = frozenset(model.state_dict()) if plan.purpose == "merge" else frozenset()
    if adapter_dir and not want.holds_model:
        from unift.peft import load_adapter  # also registers unift's own PEFT methods

        model = load_adapter(model, adapter_dir)
    name = (given if is_hub_adapter(given) else Path(adapter_dir).name) if adapter_dir else Path(path).name
    return Loaded(model, tokenizer, chosen, card if adapter_dir else None, plan, spec, path, name, base_keys)


@dataclass
class _Choices:
    """What to load: the caller's arguments, with the run card's settings where they leave one open."""

    base_model: str | None
    model_type: str | None
    template: Any
    trust: bool
    rope_scaling: str | None
    attn_implementation: str | None
    reward: bool
    holds_model: bool  # the run folder is the whole trained model, not an adapter


def _foreign_card(adapter_dir: str, base_model: str | None, model_type: str | None, template: Any) -> RunCard:
    from unift.peft.foreign import read_card  # a foreign adapter's method: the method registry

    return read_card(adapter_dir, base_model=base_model, model_type=model_type,
                     template=template if isinstance(template, str) else None)


def _choices(adapter_dir: str | None, card: RunCard | None, *, base_model: str | None, model_type: str | None,
             template: Any, trust_remote_code: bool | None, reward: bool, allow_reward: bool,
             rope_scaling: str | None, attn_implementation: str | None) -> _Choices:
    """A run loads as it trained unless a flag says otherwise. Refuses a reward model's folder unless the
    caller scores with it, and a base put under a folder that holds the whole trained model."""
    if not card:
        return _Choices(base_model, model_type, template, bool(trust_remote_code), rope_scaling,
                        attn_implementation, reward, False)
    if card.stage == "rm":
        if not allow_reward:
            raise UniftError(f"{adapter_dir} is a reward model (--stage rm): it scores answers, it does not write "
                             f"them; score pairs with: unift eval --adapter_dir {adapter_dir} --pairs DATA")
        reward = True
    base_model = base_model or card.base_model
    if card.holds_model:  # the run folder is the trained model; its base is only where it came from
        if base_model and base_model != card.base_model:
            raise UniftError(f"{adapter_dir} holds the whole trained model (--peft_type {card.peft_type}), not "
                             "an adapter: it cannot be put over --model_name_or_path; leave that flag out")
        base_model = adapter_dir
    return _Choices(base_model, model_type or card.model_type, template or card.template,
                    card.trust_remote_code if trust_remote_code is None else trust_remote_code,
                    rope_scaling or card.rope_scaling, attn_implementation or card.attn_implementation,
                    reward, bool(card.holds_model))


def _load_weights(path: str, spec: ModelSpec, plan: DtypePlan, placed_on: str, want: _Choices, tokenizer: Any) -> Any:
    """The transformers model, placed and in the plan's dtypes, before any adapter is put in."""
    model = load_model(path, spec, quantization_bit=plan.quantization_bit, compute_dtype=plan.compute_dtype,
                       dtype=plan.storage_dtype, trust_remote_code=want.trust,
                       device_map=_placement(plan, placed_on, path),
                       quant_storage=torch_dtype(plan.quant_storage) if plan.quant_storage else None,
                       reward=want.reward, rope_scaling=want.rope_scaling,
                       attn_implementation=want.attn_implementation)
    if want.reward and model.config.pad_token_id is None:  # the scoring head reads the last token before padding
        model.config.pad_token_id = tokenizer.pad_token_id
    if plan.upcast_unquantized:
        upcast_unquantized(model)
    return model


def _placement(plan: DtypePlan, device: str, path: str) -> dict | str | None:
    """device_map for from_pretrained. Training: the CPU, or the process's own GPU (the Trainer and
    load_model place it); a quantized base is built on the device it runs on; else the device, spread over
    the GPUs when it does not fit on one, except for a merge (a model spread over devices is not merged:
    it stays on the CPU)."""
    if plan.purpose == "train":
        return {"": "cpu"} if plan.quantized and device == "cpu" else None
    if plan.quantized:
        return {"": device}
    where = device_map_for(device, path, plan.storage_dtype)
    return None if plan.purpose == "merge" and where == "auto" else where

