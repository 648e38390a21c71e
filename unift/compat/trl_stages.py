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
