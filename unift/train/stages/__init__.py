"""--stage: what a run trains. One file per stage in this package registers its StageSpec (its flags, the
data it reads, how its trainer is built, its checks), in the order `unift list` and --help show them; the
registry itself is unift.train.stages.registry. Adding a stage is one file here and one test.

sft is unift's own Trainer (unift.train.trainer). The preference stages (dpo, orpo, simpo, kto, rm) run
TRL's trainers with unift's hooks on rows unift tokenized itself with the run's template
(unift.train.preference); grpo runs TRL's GRPOTrainer on prompts, scored by reward functions
(unift.train.rewards). The reference of dpo, kto and grpo is the base with the adapter switched off: no
second copy of the weights (TRL's copy of a PEFT adapter as a "ref" adapter is deleted; a full or freeze
run, with no adapter to switch off, gets a frozen copy of the model).
"""

from __future__ import annotations

from unift.train.stages import dpo, grpo, kto, orpo, rm, sft, simpo  # noqa: F401  (each registers its stage)
from unift.train.stages.registry import (
    README_END,
    README_START,
    STAGES,
    StageSpec,
    apply_stage_optimizer,
    check_stage,
    get_stage,
    register_stage,
    stage_flag_fields,
    stage_levers,
    stage_matrix,
    stage_table,
)

__all__ = ["README_END", "README_START", "STAGES", "StageSpec", "apply_stage_optimizer", "check_stage", "get_stage",
           "register_stage", "stage_flag_fields", "stage_levers", "stage_matrix", "stage_table"]
