"""peft: prefix tuning generates only with the KV cache. Written against peft 0.22.0 and transformers 5.25.0.

Applied by unift.compat.apply(). tests/test_compat.py fails once peft generates a prefix-tuned model with
`use_cache=False`.

Prefix tuning lives in the KV cache: peft puts the virtual keys and values there before the first step.
With `use_cache=False` transformers still keeps the cache the model returns and slices the next step's
inputs against its length, so the second step fails on shapes ("mat1 and mat2 shapes cannot be
multiplied"). The fix always generates prefix-tuned models with the cache; the tokens are the same.
"""

from __future__ import annotations

from typing import Any


def apply() -> None:
    """Patch peft's PeftModelForCausalLM.generate (imports peft; idempotent: the patched method says so)."""
    from peft import PeftModelForCausalLM
    from peft.utils import PeftType

    original = PeftModelForCausalLM.generate
    if getattr(original, "_unift_prefix_cache", False):
        return

    def generate(self: Any, *args: Any, **kwargs: Any):
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["use_cache"] = True
        return original(self, *args, **kwargs)

    generate._unift_prefix_cache = True
    generate.__wrapped__ = original  # the tests run the unpatched path through it
    PeftModelForCausalLM.generate = generate
