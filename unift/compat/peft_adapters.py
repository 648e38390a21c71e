"""peft: two adapter-dtype workarounds for half-precision bases. Written against peft 0.21.2.

Both come from peft upcasting a half-precision (bf16/fp16) base's adapter to fp32 after building it
(`cast_adapter_dtype` in peft/tuners/tuners_utils.py, `autocast_adapter_dtype=True` by default):
- the upcast re-creates each adapter Parameter from `param.to(torch.float32)`, a plain tensor that
  ParameterDict wraps into a new, trainable Parameter: AdaLoRA's `ranknum` (a constant, the rank it divides
  by, created with requires_grad=False) becomes trainable (`freeze_ranknum`);
- `PeftModel.from_pretrained` of a trained AdaLoRA adapter (its config has a `rank_pattern`) resizes the
  modules to the pruned ranks with `update_layer`, which builds them in the base's dtype, and loads the saved
  fp32 weights into those: they come back rounded to bf16 (measured: logits 0.08 away from the trained
  model's) (`reload_saved_weights`).
tests/test_compat.py fails once either is fixed upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"


def freeze_ranknum(model: Any) -> int:
    """Make AdaLoRA's `ranknum` constants untrainable again; returns how many there were."""
    count = 0
    for name, param in model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
            count += 1
    return count


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
