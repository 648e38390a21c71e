"""--stage sft: supervised fine-tuning on instruction data, with unift's own Trainer."""

from __future__ import annotations

from typing import Any

from unift.train.stages.registry import StageSpec, register_stage


def build(stage: StageSpec, args: Any, settings: dict, ready: Any, model: Any, callbacks: list | None):
    from unift.train.trainer import supervised_trainer

    return supervised_trainer(settings, ready, model, callbacks)


register_stage(StageSpec("sft", "supervised fine-tuning on instruction data", "sft", order=0, build=build))
