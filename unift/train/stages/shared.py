"""What several stages share: the flags more than one reads (defined once here), the methods no preference
stage trains, TRL's schedule, and the build of TRL's preference trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unift.errors import UniftError
from unift.options import NON_NEGATIVE, opt
from unift.train.stages.registry import StageSpec

if TYPE_CHECKING:  # prepared.py imports the stage registry, whose package imports this file
    from unift.train.prepared import PreparedRun


@dataclass
class BetaFlags:
    pref_beta: float | None = opt(None, "the preference loss's beta (default: dpo 0.1, orpo 0.1 (its lambda), "
                                  "simpo 2.0, kto 0.1; grpo: the KL weight, 0 = no reference)", group="stage",
                                  range=NON_NEGATIVE)


@dataclass
class ReferenceFlags:
    ref_model: str | None = opt(None, "dpo, kto: a separate reference model, a model or run folder (default: the "
                                "base with the adapter switched off, no second copy in memory)", group="stage")


# Methods no preference stage can train, and why (measured with TRL 1.16, peft 0.21)
PREFERENCE_REFUSALS = {
    "adalora": "TRL's preference trainers add a copy of the adapter as the reference, and AdaLoRA allows one "
               "trainable adapter only",
}

# TRL's own schedule for its preference trainers (linear decay, no warm-up), so that --stage dpo takes the
# steps DPOTrainer takes (tests/test_dpo_vs_trl.py; bench/dpo_vs_trl.py measured the cosine schedule with
# warm-up, unift's supervised default, at 0.85x TRL's margin gain on arith_pairs)
TRL_SCHEDULE = {"lr_scheduler_type": "linear", "warmup_ratio": 0.0}


def check_beta(args: Any) -> None:
    """The preference losses divide by beta or scale by it: 0 would train nothing (grpo's 0 means no KL)."""
    if args.pref_beta == 0:
        raise UniftError(f"--pref_beta must be > 0 for --stage {args.stage} (0 is for grpo: no KL term)")


def build_preference(stage: StageSpec, args: Any, settings: dict, prepared: PreparedRun, model: Any, callbacks: list | None):
    from unift.train.preference import preference_trainer

    return preference_trainer(stage, args, settings, prepared, model, callbacks)
