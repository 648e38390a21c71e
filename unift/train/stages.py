"""--stage: what a run trains. One StageSpec per stage.

sft is unift's own Trainer (unift.train.trainer). The preference stages run TRL's trainers with unift's
hooks (atomic checkpoints, token counts, the progress line) mixed in, on rows unift tokenized itself with
the run's template (unift.data.preference), so TRL's own tokenization is skipped:
- dpo: TRL's DPOTrainer and its losses (--pref_loss picks one: sigmoid is DPO, ipo, hinge, robust, ...);
  one forward over chosen and rejected concatenated, log-probabilities of the answer tokens only.
- orpo, simpo: TRL keeps these losses in its experimental ORPO and CPO trainers, whose data path tokenizes
  text itself (unift's templates and truncation would not apply). They run on DPOTrainer's data path
  instead, and the loss calls TRL's own functions (ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss) on
  the length-normalised log-probabilities: the formulas stay TRL's, in one place.
- kto: TRL's KTOTrainer (unpaired answers labelled desirable or not).
- rm: TRL's RewardTrainer: the family's sequence-classification model (one output, read at the last
  token) learns to score the chosen answer above the rejected one; the head trains whole beside the
  adapter and is saved with it.
- grpo: TRL's GRPOTrainer (unift.train.grpo): completions sampled from the policy, scored by reward
  functions (unift.train.rewards), on prompts of instruction data whose answers are the references.
The reference of dpo and kto is the base with the adapter switched off: no second copy of the weights.
TRL copies a PEFT adapter as a "ref" adapter; unift deletes that copy, so the reference is the base model
itself (for LoRA, whose update starts at zero, the same model; for other methods the base without them).
A full or freeze run has no adapter to switch off, so it gets a frozen copy of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError
from unift.peft import method_names

log = logging.getLogger("unift")

# TRL 1.16's DPO losses (DPOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
# Speed levers that replace the training forward: TRL's trainers run their own (label-only log-probs)
FORWARD_LEVERS = {"label_loss": "the preference trainers compute answer-only log-probabilities themselves",
                  "padding_free": "preference batches keep chosen and rejected rows apart"}


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    kind: str  # what it trains on: sft, pairs or unpaired (unift.data.layouts.KINDS)
    beta: float = 0.0  # default --pref_beta
    reference: bool = False  # needs the reference model's log-probabilities
    reward: bool = False  # trains a scoring head (a reward model) instead of the language-model head
    flags: tuple[str, ...] = ()  # the stage flags it reads
    settings: Callable[[Any], dict] = lambda args: {}  # TRL config fields from the flags
    unsupported: dict[str, str] = field(default_factory=dict)  # peft_type -> why not
    families: dict[str, str] = field(default_factory=dict)  # model_type -> why not
    # the optimizer settings this stage trains best with (flag -> value), taken where --optim is not given,
    # for each of these flags left at its default
    optimizer: dict[str, Any] = field(default_factory=dict)


# Methods no preference stage can train, and why (measured with TRL 1.16, peft 0.21)
PREFERENCE_REFUSALS = {
    "adalora": "TRL's preference trainers add a copy of the adapter as the reference, and AdaLoRA allows one "
               "trainable adapter only",
}

GRPO_FLAGS = ("pref_beta", "reward_funcs", "reward_weights", "num_generations", "max_completion_length", "temperature",
              "loss_type", "scale_rewards")
STAGE_FLAGS = tuple(dict.fromkeys(("pref_beta", "pref_loss", "simpo_gamma", "kto_desirable_weight",
                                   "kto_undesirable_weight", "ref_model", *GRPO_FLAGS)))
# TRL 1.16's GRPO losses (GRPOConfig.loss_type) that need no other setting
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")

STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    STAGES[spec.name] = spec
    return spec


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise UniftError(f"unknown --stage {name!r}; known: {', '.join(STAGES)}") from None


def _beta(args: Any, stage: StageSpec) -> float:
    return stage.beta if args.pref_beta is None else args.pref_beta


# TRL's own schedule for its preference trainers (linear decay, no warm-up), so that --stage dpo takes the
# steps DPOTrainer takes (tests/test_dpo_vs_trl.py; bench/dpo_vs_trl.py measured the cosine schedule with
# warm-up, unift's supervised default, at 0.85x TRL's margin gain on arith_pairs)
TRL_SCHEDULE = {"lr_scheduler_type": "linear", "warmup_ratio": 0.0}
register_stage(StageSpec("sft", "supervised fine-tuning on instruction data", "sft"))
register_stage(StageSpec(
    "dpo", "direct preference optimisation (TRL's DPO losses, --pref_loss) over chosen/rejected pairs", "pairs",
    beta=0.1, reference=True, flags=("pref_beta", "pref_loss", "ref_model"), unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["dpo"]), "loss_type": [args.pref_loss]},
    optimizer=TRL_SCHEDULE))
register_stage(StageSpec(
    "orpo", "odds-ratio preference optimisation: the chosen answer's loss plus an odds-ratio term, no reference",
    "pairs", beta=0.1, flags=("pref_beta",), unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["orpo"])}, optimizer=TRL_SCHEDULE))
register_stage(StageSpec(
    "simpo", "SimPO: length-normalised log-probability margin with a target gap (--simpo_gamma), no reference",
    "pairs", beta=2.0, flags=("pref_beta", "simpo_gamma"), unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["simpo"])}, optimizer=TRL_SCHEDULE))
register_stage(StageSpec(
    "kto", "Kahneman-Tversky optimisation over answers labelled desirable or not (TRL's KTO)", "unpaired",
    beta=0.1, reference=True, flags=("pref_beta", "kto_desirable_weight", "kto_undesirable_weight", "ref_model"),
    unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["kto"]), "desirable_weight": args.kto_desirable_weight,
                           "undesirable_weight": args.kto_undesirable_weight,
                           # KTO pairs each answer with its batch neighbour's prompt for the KL term (in
                           # _prepare_dataset): the batches must be the dataset's order, already shuffled
                           "train_sampling_strategy": "sequential"},
    optimizer=TRL_SCHEDULE))

register_stage(StageSpec(
    "rm", "reward model: a scoring head trained to rank the chosen answer above the rejected one (TRL's "
    "RewardTrainer)", "pairs", reward=True,
    unsupported={"prefix": "transformers' sequence-classification models take no past key values, which prefix "
                           "tuning feeds its prefixes through"},
    families={"moss": "transformers has no sequence-classification model for MOSS's CodeGen architecture"}))
# GRPO's gradient from a few sampled groups is mostly noise, which Adam's per-weight scaling turns into
# full-size steps on every weight (measured on arith from a 56% SFT adapter: AdamW at 1e-4 to 5e-4 kept 56%
# or fell to 29-38%, its answers' perplexity rising); plain SGD moves along the gradient, its step bounded
# by the gradient clipping, and raised exact match to 63-68% in 40 steps (docs/stages.md)
GRPO_OPTIMIZER = {"optim": "sgd", "learning_rate": 0.3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
register_stage(StageSpec(
    "grpo", "group relative policy optimisation (TRL's GRPO): sampled answers scored by reward functions "
    "(--reward_funcs), no reference unless --pref_beta > 0", "prompts", beta=0.0, flags=GRPO_FLAGS,
    optimizer=GRPO_OPTIMIZER))


def apply_stage_optimizer(args: Any, defaults: dict[str, Any]) -> None:
    """Without --optim, the stage's own optimizer settings replace the flags left at their defaults."""
    stage = get_stage(args.stage)
    if not stage.optimizer or args.optim != defaults["optim"]:
        return
    for name, value in stage.optimizer.items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)


def _check_grpo(args: Any) -> None:
    from unift.train.rewards import check_reward_spec

    specs = [s for item in args.reward_funcs for s in str(item).split(",") if s]
    if not specs:
        raise UniftError("--reward_funcs needs at least one reward")
    for spec in specs:
        check_reward_spec(spec)
    args.reward_funcs = specs
    if args.reward_weights is not None and len(args.reward_weights) != len(specs):
        raise UniftError(f"--reward_weights has {len(args.reward_weights)} values for {len(specs)} --reward_funcs; "
                         "give one weight per reward")
    if args.peft_type == "adalora" and args.pref_beta:
        raise UniftError("--stage grpo with --pref_beta > 0 does not work with --peft_type adalora: "
                         f"{PREFERENCE_REFUSALS['adalora']}; leave --pref_beta at 0")
    if args.num_generations < 2:
        raise UniftError("--num_generations must be 2 or more: GRPO compares each answer with the others of its group")
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps
    if per_step % args.num_generations:
        raise UniftError(f"--stage grpo: --per_gpu_train_batch_size x --gradient_accumulation_steps ({per_step}) counts "
                         f"completions and must be a multiple of --num_generations ({args.num_generations})")


def check_stage(args: Any, defaults: dict[str, Any]) -> None:
    """Parse-time checks: a stage flag the stage ignores, batch sizes KTO needs, pairs the stage refuses."""
    stage = get_stage(args.stage)
    ignored = [f"--{name}" for name in STAGE_FLAGS if name not in stage.flags and getattr(args, name) != defaults[name]]
    if ignored:
        reads = ", ".join(f"--{f}" for f in stage.flags) or "none of them"
        raise UniftError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by --stage "
                         f"{stage.name} (it reads {reads})")
    if stage.name == "kto" and args.per_gpu_train_batch_size < 2:
        raise UniftError("--stage kto needs --per_gpu_train_batch_size 2 or more: its KL term pairs each answer "
                         "with another prompt of the same batch")
    reason = stage.families.get(args.model_type)
    if reason:
        raise UniftError(f"--stage {stage.name} does not work with --model_type {args.model_type}: {reason}")
    reason = stage.unsupported.get(args.peft_type)
    if reason:
        raise UniftError(f"--stage {stage.name} does not work with --peft_type {args.peft_type}: {reason}")
    if args.pref_beta == 0 and stage.name != "grpo":
        raise UniftError(f"--pref_beta must be > 0 for --stage {stage.name} (0 is for grpo: no KL term)")
    if stage.name == "grpo":
        _check_grpo(args)
    if stage.kind != "sft" and args.streaming:
        raise UniftError(f"--stage {stage.name} reads its data whole; --streaming is for supervised data")


def stage_levers(stage: StageSpec, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The speed levers a stage can take, and why the others are left out."""
    left_out = {} if stage.kind == "sft" else {w: FORWARD_LEVERS[w] for w in wanted if w in FORWARD_LEVERS}
    if stage.name != "grpo" and "merged_sampling" in wanted:
        left_out["merged_sampling"] = "only --stage grpo samples while it trains"
    return tuple(w for w in wanted if w not in left_out), left_out


def stage_matrix() -> dict[str, dict[str, str]]:
    """{stage: {peft_type: "" if it works, else the reason}}."""
    return {name: {p: stage.unsupported.get(p, "") for p in method_names()} for name, stage in STAGES.items()}


README_START, README_END = "<!-- stage-matrix:start -->", "<!-- stage-matrix:end -->"


def stage_table() -> str:
    """The stage x method table with the reason for every refusal, as Markdown (`unift list`, the README)."""
    matrix = stage_matrix()
    methods = list(next(iter(matrix.values())))
    lines = ["| stage | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    notes: dict[str, int] = {}
    for stage, row in matrix.items():
        cells = [f"no ({notes.setdefault(f'{m}: {why}', len(notes) + 1)})" if why else "yes" for m, why in row.items()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"({i}) {n}" for n, i in notes.items()]
    return ("Stages (--stage) by method (docs/stages.md). yes = the pair trains: tests/test_stages.py (grpo: "
            "tests/test_grpo.py) runs every stage with LoRA on every family and with a set of methods in CI, every "
            "pair with UNIFT_ALL_STAGE_PAIRS=1:\n\n" + "\n".join(lines))


if __name__ == "__main__":  # python -m unift.train.stages --update-readme: rewrite the README's copy
    import sys
    from pathlib import Path

    from unift.peft.support import replace_between

    if sys.argv[1:] == ["--update-readme"]:
        changed = replace_between(Path("README.md"), README_START, README_END, stage_table())
        print(f"README.md: {'updated' if changed else 'already up to date'}")
    else:
        print(stage_table())
