"""TRL 1.16's preference trainers (DPOTrainer, KTOTrainer) given a PeftModel without a reference model copy
its adapter as a second adapter named "ref" and compute the reference log-probabilities with it. unift's
reference is the base model with the adapter switched off (no second set of weights, nothing to keep in
step), which TRL uses when no "ref" adapter exists: `drop_reference_adapter` deletes the copy after the
trainer is built. tests/test_compat.py checks that TRL still adds it, so this module goes when TRL stops.
"""

from __future__ import annotations

from typing import Any

REFERENCE_ADAPTER = "ref"


def drop_reference_adapter(model: Any) -> bool:
    """Delete TRL's "ref" adapter copy from a PeftModel; True when there was one."""
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        return False
    model.delete_adapter(REFERENCE_ADAPTER)
    if model.active_adapter != "default":  # set_adapter would also make every default parameter trainable
        model.set_adapter("default")
    return True


def score_answer_tokens_only() -> None:
    """TRL's fused output head (preference log-probabilities) projects only the answer positions on CUDA, but
    every position, prompt and padding included, elsewhere: a rule for Neuron, whose compiler would rebuild
    its kernels for every count of answer tokens. A CPU has no such compiler, so there the answer positions
    alone are scored too (measured on a tiny llama DPO step: most of the step was the full-width head).
    Process-wide and idempotent; the results are the same numbers (a test compares them)."""
    import trl.trainer.utils as utils

    original = utils._use_triton
    if getattr(original, "unift_cpu_compact", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact.unift_cpu_compact = True
    utils._use_triton = compact
