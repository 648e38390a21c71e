"""--stage simpo: SimPO, no reference: beta x the margin of the length-normalised log-probabilities of
chosen over rejected, minus a target gap (--simpo_gamma), through a log-sigmoid. TRL keeps it in its
experimental CPOTrainer; unift runs it on DPOTrainer's batches of its own rows and calls
CPOTrainer.cpo_loss with loss_type "simpo", so the formula stays TRL's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.options import NON_NEGATIVE, opt
from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import (
    PREFERENCE_REFUSALS,
    TRL_SCHEDULE,
    BetaFlags,
    build_preference,
    check_beta,
)


@dataclass
class SimpoFlags(BetaFlags):
    simpo_gamma: float = opt(0.5, "--stage simpo's target reward margin", group="stage", range=NON_NEGATIVE)


def pair_loss(trainer: Any, chosen: Any, rejected: Any, chosen_sums: Any, chosen_counts: Any):
    from trl.experimental.cpo import CPOTrainer

    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.mean(), chosen_rewards, rejected_rewards


def cpo_settings(trainer: Any, args: Any) -> None:
    """What CPOTrainer.cpo_loss reads from its trainer; alpha 0: no AlphaPO reward transform."""
    trainer.loss_type, trainer.simpo_gamma, trainer.label_smoothing, trainer.alpha = "simpo", args.simpo_gamma, 0.0, 0.0


register_stage(StageSpec(
    "simpo", "SimPO: length-normalised log-probability margin with a target gap (--simpo_gamma), no reference",
    "pairs", order=3, build=build_preference, flags=SimpoFlags, beta=2.0, trl_trainer="DPOTrainer",
    pair_loss=pair_loss, configure=cpo_settings,
    check=check_beta,
    unsupported=PREFERENCE_REFUSALS, optimizer=TRL_SCHEDULE))
