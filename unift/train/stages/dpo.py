"""--stage dpo: direct preference optimisation on TRL's DPOTrainer and its losses (--pref_loss: sigmoid is
DPO, ipo, hinge, robust, ...): one forward over chosen and rejected concatenated, the log-probabilities of
the answer tokens only, against the reference (the base with the adapter switched off)."""

from __future__ import annotations

from dataclasses import dataclass

from unift.options import opt
from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import (
    PREFERENCE_REFUSALS,
    TRL_SCHEDULE,
    BetaFlags,
    ReferenceFlags,
    build_preference,
    check_beta,
)

# TRL 1.16's DPO losses (DPOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclass
class DpoFlags(ReferenceFlags, BetaFlags):
    pref_loss: str = opt("sigmoid", "--stage dpo's loss, one of TRL's: sigmoid (DPO), ipo, hinge, robust, "
                         "sigmoid_norm, ...", group="stage", choices=DPO_LOSSES)


register_stage(StageSpec(
    "dpo", "direct preference optimisation (TRL's DPO losses, --pref_loss) over chosen/rejected pairs", "pairs",
    order=1, build=build_preference, flags=DpoFlags, beta=0.1, reference=True, trl_trainer="DPOTrainer",
    settings=lambda args: {"loss_type": [args.pref_loss]}, check=check_beta,
    unsupported=PREFERENCE_REFUSALS, optimizer=TRL_SCHEDULE))
