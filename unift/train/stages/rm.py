"""--stage rm: a reward model on TRL's RewardTrainer. The family's sequence-classification model (one
output, read at the last token) learns to score the chosen answer above the rejected one; the scoring
head trains whole beside the adapter and is saved with it."""

from __future__ import annotations

from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import build_preference

register_stage(StageSpec(
    "rm", "reward model: a scoring head trained to rank the chosen answer above the rejected one (TRL's "
    "RewardTrainer)", "pairs", order=5, build=build_preference, reward=True, trl_trainer="RewardTrainer",
    unsupported={"prefix": "transformers' sequence-classification models take no past key values, which prefix "
                           "tuning feeds its prefixes through"},
    families={"moss": "transformers has no sequence-classification model for MOSS's CodeGen architecture"}))
