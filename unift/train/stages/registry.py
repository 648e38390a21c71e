"""The stage registry: StageSpec, the lookup, and what every stage shares (the parse-time checks, the
optimizer settings a stage trains best with, the speed levers it can take, the stage x method table)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError
from unift.peft import method_names

log = logging.getLogger("unift")

# Speed levers that replace the training forward: TRL's trainers run their own (label-only log-probs)
FORWARD_LEVERS = {"label_loss": "the preference trainers compute answer-only log-probabilities themselves",
                  "padding_free": "preference batches keep chosen and rejected rows apart"}


@dataclass(frozen=True)
class StageSpec:
    """One --stage. `build(stage, args, settings, prepared, model, callbacks)` returns its trainer, given the
    TrainingArguments fields unift computed (`settings`) and the prepared run; `check(args)` refuses, at parse
    time, what the stage cannot train."""

    name: str
    description: str
    kind: str  # what it trains on: sft, pairs, unpaired or prompts (unift.data.layouts.KINDS)
    order: int  # its place in `unift list`, --help and the README's table
    build: Callable[..., Any]
    flags: type | None = None  # a dataclass of the flags it reads, defined with unift.options.opt
    beta: float = 0.0  # default --pref_beta
    reference: bool = False  # needs the reference model's log-probabilities
    reward: bool = False  # trains a scoring head (a reward model) instead of the language-model head
    trl_trainer: str | None = None  # TRL's trainer class it runs (its config: the same name with Config)
    settings: Callable[[Any], dict] = lambda args: {}  # TRL config fields from the flags, beside beta
    # orpo, simpo: (trainer, chosen, rejected, chosen log-prob sums, chosen token counts) -> (loss, chosen
    # rewards, rejected rewards), on the length-normalised answer log-probabilities of DPOTrainer's batches
    pair_loss: Callable[..., Any] | None = None
    configure: Callable[[Any, Any], None] | None = None  # (the built trainer, args): settings its loss reads
    check: Callable[[Any], None] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)  # peft_type -> why not
    families: dict[str, str] = field(default_factory=dict)  # model_type -> why not
    # the optimizer settings this stage trains best with (flag -> value), taken where --optim is not given,
    # for each of these flags left at its default
    optimizer: dict[str, Any] = field(default_factory=dict)

    def beta_for(self, args: Any) -> float:
        """--pref_beta, or this stage's default."""
        return self.beta if args.pref_beta is None else args.pref_beta

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.flags)) if self.flags else ()


STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    STAGES[spec.name] = spec
    ordered = sorted(STAGES.values(), key=lambda s: s.order)
    STAGES.clear()
    STAGES.update((s.name, s) for s in ordered)
    return spec


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise UniftError(f"unknown --stage {name!r}; known: {', '.join(STAGES)}") from None


def stage_flag_fields() -> list[dataclasses.Field]:
    """Every stage's flag fields, once each, in stage order: the union `unift train` offers. Flags several
    stages read (--pref_beta, --ref_model) come from one class in unift.train.stages.shared."""
    found: dict[str, dataclasses.Field] = {}
    for stage in STAGES.values():
        for f in dataclasses.fields(stage.flags) if stage.flags else ():
            seen = found.setdefault(f.name, f)
            if seen.metadata.get("defined_in") != f.metadata.get("defined_in"):
                raise TypeError(f"--{f.name} is defined by two stages ({stage.name} and another); define it once in "
                                "unift/train/stages/shared.py")
    return list(found.values())


def apply_stage_optimizer(args: Any, defaults: dict[str, Any]) -> None:
    """Without --optim, the stage's own optimizer settings replace the flags left at their defaults."""
    stage = get_stage(args.stage)
    if not stage.optimizer or args.optim != defaults["optim"]:
        return
    for name, value in stage.optimizer.items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)


def check_stage(args: Any, defaults: dict[str, Any]) -> None:
    """Parse-time checks: a stage flag the stage ignores, the families and methods it refuses, then its own."""
    stage = get_stage(args.stage)
    every = dict.fromkeys(name for s in STAGES.values() for name in s.flag_names)
    ignored = [f"--{name}" for name in every if name not in stage.flag_names and getattr(args, name) != defaults[name]]
    if ignored:
        reads = ", ".join(f"--{f}" for f in stage.flag_names) or "none of them"
        raise UniftError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by --stage "
                         f"{stage.name} (it reads {reads})")
    reason = stage.families.get(args.model_type)
    if reason:
        raise UniftError(f"--stage {stage.name} does not work with --model_type {args.model_type}: {reason}")
    reason = stage.unsupported.get(args.peft_type)
    if reason:
        raise UniftError(f"--stage {stage.name} does not work with --peft_type {args.peft_type}: {reason}")
    if stage.check is not None:
        stage.check(args)
    if stage.kind != "sft" and args.streaming:
        raise UniftError(f"--stage {stage.name} reads its data whole; --streaming is for supervised data")


def stage_levers(stage: StageSpec, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The speed levers a stage can take, and why the others are left out."""
    left_out = {} if stage.kind == "sft" else {w: FORWARD_LEVERS[w] for w in wanted if w in FORWARD_LEVERS}
    if stage.kind != "prompts" and "merged_sampling" in wanted:
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
