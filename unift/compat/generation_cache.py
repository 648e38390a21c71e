"""peft x transformers: the generation cache keyword. Written against peft 0.21.2 and transformers 5.24.0.

Applied by unift.compat.apply(). tests/test_compat.py fails once peft reads the cache under its new name.

transformers 5.x renamed the generation cache keyword from `past_key_values` to `cache`. peft 0.21's
`PeftModelForCausalLM.prepare_inputs_for_generation` still looks for `past_key_values`, so for the
prompt-learning methods it never sees the KV cache during generation:
- prefix tuning: the virtual key/values are put under `past_key_values` while the model reads the empty
  `cache`, so the prefix is silently dropped (the first generated token already differs from a forward pass);
- prompt tuning / p-tuning: the virtual tokens are injected again at every decoding step.
- prefix tuning with use_cache=False breaks on shapes (the returned cache is kept and the inputs sliced).
The fix hands peft the cache under the name it expects and gives it back to the model under that name too
(the model's forward still accepts `past_key_values` as a deprecated alias of `cache`), and always generates
prefix-tuned models with the cache. Training is not
affected: peft's forward passes `past_key_values`, which the model maps to `cache` itself.
"""

from __future__ import annotations

import inspect
from typing import Any

_APPLIED = False


def _transformers_renamed_cache() -> bool:
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" in params and "past_key_values" not in params


def apply() -> None:
    """Patch peft's PeftModelForCausalLM (imports peft; unift.compat.apply() defers this to peft's import)."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    if not _transformers_renamed_cache():
        return
    from peft import PeftModelForCausalLM
    from peft.utils import PeftType

    original = PeftModelForCausalLM.prepare_inputs_for_generation
    if getattr(original, "_unift_cache_compat", False):
        return

    def prepare_inputs_for_generation(self: Any, *args: Any, **kwargs: Any) -> dict:
        config = self.active_peft_config
        if not config.is_prompt_learning:
            return original(self, *args, **kwargs)
        base_prepare = self.base_model_prepare_inputs_for_generation
        is_prefix = config.peft_type == PeftType.PREFIX_TUNING

        def renamed(*a: Any, **k: Any) -> dict:
            inputs = base_prepare(*a, **k)
            if "cache" in inputs and "past_key_values" not in inputs:
                inputs["past_key_values"] = inputs.pop("cache")
            if not is_prefix:
                # peft drops these for prompt/p-tuning anyway (the model derives positions from the cache
                # length, which counts the virtual tokens); dropping them here spares a warning per step.
                inputs.pop("position_ids", None)
            return inputs

        self.base_model_prepare_inputs_for_generation = renamed
        try:
            return original(self, *args, **kwargs)
        finally:
            self.base_model_prepare_inputs_for_generation = base_prepare

    prepare_inputs_for_generation._unift_cache_compat = True
    prepare_inputs_for_generation.__wrapped__ = original  # the tests run the unpatched path through it
    PeftModelForCausalLM.prepare_inputs_for_generation = prepare_inputs_for_generation

    original_generate = PeftModelForCausalLM.generate

    def generate(self: Any, *args: Any, **kwargs: Any):
        # Prefix tuning lives in the KV cache: with use_cache=False transformers still keeps the cache the
        # model returns and slices the inputs against it, which breaks the shapes. Always generate with it.
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["use_cache"] = True
        return original_generate(self, *args, **kwargs)

    generate.__wrapped__ = original_generate
    PeftModelForCausalLM.generate = generate
