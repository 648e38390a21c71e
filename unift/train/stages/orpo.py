"""--stage orpo: odds-ratio preference optimisation, no reference. The answer's cross-entropy on the chosen
answer (its tokens only, as the ORPO paper and LLaMA-Factory have it) minus lambda (--pref_beta) x the
log-sigmoid of the log odds ratio of chosen over rejected. TRL keeps ORPO in its experimental ORPOTrainer,
whose data path tokenizes text itself; unift runs it on DPOTrainer's batches of its own rows and calls
ORPOTrainer.odds_ratio_loss for the odds term, so the formula stays TRL's."""

from __future__ import annotations

from typing import Any

from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import (
    PREFERENCE_REFUSALS,
    TRL_SCHEDULE,
    BetaFlags,
    build_preference,
    check_beta,
)


def pair_loss(trainer: Any, chosen: Any, rejected: Any, chosen_sums: Any, chosen_counts: Any):
    from trl.experimental.orpo import ORPOTrainer

    ratio, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    loss = -(chosen_sums.sum() / chosen_counts.sum()) - ratio.mean()  # chosen NLL minus the odds term
    return loss, chosen_rewards, rejected_rewards


register_stage(StageSpec(
    "orpo", "odds-ratio preference optimisation: the chosen answer's loss plus an odds-ratio term, no reference",
    "pairs", order=2, build=build_preference, flags=BetaFlags, beta=0.1, trl_trainer="DPOTrainer",
    pair_loss=pair_loss, check=check_beta,
    unsupported=PREFERENCE_REFUSALS, optimizer=TRL_SCHEDULE))
