"""--stage sft: supervised fine-tuning on instruction data, with unift's own Trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unift.train.stages.registry import StageSpec, register_stage

if TYPE_CHECKING:  # prepared.py imports the stage registry, whose package imports this file
    from unift.train.prepared import PreparedRun


def build(stage: StageSpec, args: Any, settings: dict, prepared: PreparedRun, model: Any, callbacks: list | None):
    from unift.train.trainer import supervised_trainer

    return supervised_trainer(settings, prepared, model, callbacks)


register_stage(StageSpec("sft", "supervised fine-tuning on instruction data", "sft", order=0, build=build))
