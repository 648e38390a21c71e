"""peft: an adapter-dtype workaround for half-precision bases, and a spurious AdaLoRA warning. Written
against peft 0.22.0.

peft upcasts a half-precision (bf16/fp16) base's adapter to fp32 after building it (`cast_adapter_dtype`,
`autocast_adapter_dtype=True` by default), but `PeftModel.from_pretrained` of a trained AdaLoRA adapter (its
config has a `rank_pattern`) resizes the modules to the pruned ranks with `update_layer`, which builds them
in the base's dtype, and loads the saved fp32 weights into those: they come back rounded to bf16 (measured:
logits 0.08 away from the trained model's) (`reload_saved_weights`).
And the warning: AdaLoRA saves its `rank_pattern` as {"<module path>.lora_E": [kept rank mask]}
(the adapter name stripped), a mask per module that AdaLoRA itself applies after injecting
(`resize_modules_by_rank_pattern`); peft's generic check in `BaseTuner.inject_adapter` reads every
`rank_pattern` as LoRA's {module regex: rank}, finds no module named "...lora_E" and warns "The following
rank_pattern keys did not match any targeted module or parameter and were ignored" at every reload, although nothing is
ignored (`quiet_adalora_rank_pattern`: drops that warning when each key is a targeted module + ".lora_E").
tests/test_compat.py fails once either is fixed upstream.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"


def reload_saved_weights(wrapped: Any, adapter_dir: str | Path) -> bool:
    """Over a half-precision base, load the saved adapter tensors again into the (now fp32) adapter, so
    they are exactly as saved; returns whether it did."""
    import torch
    from peft.utils import set_peft_model_state_dict

    weights = Path(adapter_dir) / WEIGHTS
    base = wrapped.get_base_model()
    if getattr(base, "dtype", torch.float32) not in (torch.float16, torch.bfloat16) or not weights.is_file():
        return False
    from safetensors.torch import load_file

    config = wrapped.peft_config["default"]
    pattern = getattr(config, "rank_pattern", None)
    if pattern is not None:
        config.rank_pattern = None  # AdaLoRA: the modules were already resized by the first load
    try:
        set_peft_model_state_dict(wrapped, load_file(str(weights)))
    finally:
        if pattern is not None:
            config.rank_pattern = pattern
    return True


_UNMATCHED = re.compile(r"The following rank_pattern keys did not match any targeted module or parameter and were "
                        r"ignored: (\[.*\])\.$", re.S)


def _adalora_mask_keys_only(message: str, model: Any) -> bool:
    """Whether the warning lists only AdaLoRA mask keys ("<module of the model>.lora_E"): nothing ignored."""
    match = _UNMATCHED.search(message)
    if not match:
        return False
    try:
        keys = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return False
    if not keys:
        return False
    for key in keys:
        if not isinstance(key, str) or not key.endswith(".lora_E"):
            return False
        try:
            model.get_submodule(key[: -len(".lora_E")])
        except AttributeError:
            return False
    return True


@contextlib.contextmanager
def quiet_adalora_rank_pattern(model: Any, adapter_dir: str | Path) -> Iterator[None]:
    """Around PeftModel.from_pretrained(model, adapter_dir) of an AdaLoRA adapter with a rank pattern: drop
    peft's spurious unmatched-rank_pattern warning (see the module docstring); other warnings are re-issued."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if str(config.get("peft_type", "")).upper() != "ADALORA" or not config.get("rank_pattern"):
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and _adalora_mask_keys_only(str(warning.message), model):
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
