"""--stage kto: Kahneman-Tversky optimisation on TRL's KTOTrainer, over single answers labelled desirable
or not; its KL term pairs each answer with another prompt of the same batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.errors import UniftError
from unift.options import POSITIVE, opt
from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import (
    PREFERENCE_REFUSALS,
    TRL_SCHEDULE,
    BetaFlags,
    ReferenceFlags,
    build_preference,
    check_beta,
)


@dataclass
class KtoFlags(ReferenceFlags, BetaFlags):
    kto_desirable_weight: float = opt(1.0, "--stage kto's weight of desirable answers", group="stage",
                                      range=POSITIVE)
    kto_undesirable_weight: float = opt(1.0, "--stage kto's weight of undesirable answers", group="stage",
                                        range=POSITIVE)


def check(args: Any) -> None:
    check_beta(args)
    if args.per_gpu_train_batch_size < 2:
        raise UniftError("--stage kto needs --per_gpu_train_batch_size 2 or more: its KL term pairs each answer "
                         "with another prompt of the same batch")


register_stage(StageSpec(
    "kto", "Kahneman-Tversky optimisation over answers labelled desirable or not (TRL's KTO)", "unpaired",
    order=4, build=build_preference, flags=KtoFlags, beta=0.1, reference=True, trl_trainer="KTOTrainer",
    settings=lambda args: {"desirable_weight": args.kto_desirable_weight,
                           "undesirable_weight": args.kto_undesirable_weight,
                           # KTO pairs each answer with its batch neighbour's prompt for the KL term (in
                           # _prepare_dataset): the batches must be the dataset's order, already shuffled
                           "train_sampling_strategy": "sequential"},
    check=check, unsupported=PREFERENCE_REFUSALS, optimizer=TRL_SCHEDULE))
