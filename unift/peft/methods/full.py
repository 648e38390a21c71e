"""Full fine-tuning: every weight of the model trains. No adapter: the run folder holds the whole trained
model (its own weights, saved with save_pretrained), which every after-training command loads in place of
a base plus an adapter."""

from __future__ import annotations

from typing import Any

from unift.models.registry import ModelSpec
from unift.peft.registry import MethodSpec, register_method


def train_everything(model: Any, options: Any, spec: ModelSpec) -> Any:
    model.requires_grad_(True)
    return model


register_method(MethodSpec(
    name="full", build=None, own_weights=train_everything, order=90, mergeable=False,
    merge_note="nothing to fold: the run folder is the whole model (`unift merge` copies it)",
    description="every weight of the model (no adapter; the run folder holds the trained model)",
))
