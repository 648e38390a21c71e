"""Run cards for adapter folders that unift did not write (LLaMA-Factory's, the hub's, any
`save_pretrained` folder): the method from peft's adapter_config.json through the method registry, the
family from the base's config through the model registry. Here, not in unift.models.runcard, because the
method registry sits a floor above the run card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unift.errors import UniftError
from unift.models.registry import family_of_hf_type
from unift.models.runcard import ADAPTER_CONFIG, RUN_CARD, RunCard
from unift.peft.registry import METHODS


def method_of_adapter(config: dict[str, Any]) -> str:
    """unift's --peft_type for an adapter_config.json: peft's PeftType names are the methods' names or
    aliases (prefix_tuning, p_tuning, prompt_tuning, bottleneck); LoRA with use_dora is dora. A type no
    method takes is kept as written (loading then names it)."""
    peft_type = str(config.get("peft_type", "lora")).lower()
    if peft_type == "lora" and config.get("use_dora"):
        return METHODS["dora"].name
    spec = METHODS.get(peft_type)
    return spec.name if spec is not None else peft_type


def read_card(folder: str | Path, *, base_model: str | None = None, model_type: str | None = None,
              template: str | None = None) -> RunCard:
    """The run card of a run folder; for a plain PEFT adapter folder (LLaMA-Factory's, the hub's, one saved
    by `save_pretrained`), a card inferred from its adapter_config.json and the base model: the base from
    `base_model` or the config's base_model_name_or_path, the family from `model_type` or the base's
    config.json, the template from `template` or the tokenizer. What was guessed is logged once."""
    folder = Path(folder)
    if (folder / RUN_CARD).exists() or not (folder / ADAPTER_CONFIG).is_file():
        return RunCard.load(folder)
    import logging

    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UniftError(f"{folder / ADAPTER_CONFIG}: unreadable ({err})") from None
    guessed = []
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise UniftError(f"{folder}: a PEFT adapter whose {ADAPTER_CONFIG} names no base model; pass "
                         "--model_name_or_path")
    if not base_model:
        guessed.append(f"base {base} (from {ADAPTER_CONFIG})")
    if not model_type:
        model_type, how = _family_of(base)
        guessed.append(f"model_type {model_type} ({how})")
    peft_type = method_of_adapter(config)
    if not template:
        template = "auto"  # the tokenizer's chat template, else alpaca (unift.data.resolve_template)
        guessed.append("template: the tokenizer's chat template (alpaca if it has none)")
    if guessed:
        logging.getLogger("unift").info("%s has no %s (not written by `unift train`): using %s; pass the flags to "
                                        "choose otherwise", folder, RUN_CARD, ", ".join(guessed))
    return RunCard(model_type=model_type, peft_type=peft_type, template=template, base_model=base,
                   arguments={"foreign_adapter": True})


def _family_of(base: str) -> tuple[str, str]:
    """(unift family, how it was found) from the base model's config.json."""
    config_file = Path(base).expanduser() / "config.json"
    hf_type = None
    if config_file.is_file():
        try:
            hf_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError):
            pass
    else:
        try:
            from transformers import AutoConfig

            hf_type = AutoConfig.from_pretrained(base).model_type  # a hub id: from the cache when offline
        except Exception:  # noqa: BLE001 (any failure here only means we cannot tell)
            pass
    spec = family_of_hf_type(hf_type)
    if spec is not None:
        return spec.name, f"the base's config says {hf_type}"
    return "llama", f"the base's config says {hf_type or 'nothing'}; llama's defaults"
