"""--stage grpo: group relative policy optimisation on TRL's GRPOTrainer with unift's hooks, on prompts
unift tokenized with the run's template.

Each step samples --num_generations completions per prompt with transformers' generate (vLLM where TRL
finds it and a GPU), scores them with the --reward_funcs (unift.train.rewards), and moves the policy
toward the completions that scored above their group's mean. The prompts are the data's prompts rendered
exactly as supervised training renders them (unift.data.preference.encode_prompt_row); generation stops at
the template's end of turn as every unift command does.

The reference of the KL term (--pref_beta > 0) is the base with the adapter switched off, or, with
--adapter_dir, the adapter as the run started (TRL's copy of it), as for dpo and kto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unift.errors import UniftError
from unift.models.flags import DecodingFlags
from unift.options import NON_NEGATIVE, POSITIVE_INT, like, opt
from unift.train.stages.registry import StageSpec, register_stage
from unift.train.stages.shared import PREFERENCE_REFUSALS, BetaFlags

if TYPE_CHECKING:  # prepared.py imports the stage registry, whose package imports this file
    from unift.train.prepared import PreparedRun

# TRL 1.16's GRPO losses (GRPOConfig.loss_type) that need no other setting
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


@dataclass
class GrpoFlags(BetaFlags):
    reward_funcs: list[str] = opt(["exact_answer"], "grpo: the rewards, built-in (exact_answer, format, length), "
                                  "FILE.py:FUNCTION, or a --stage rm run folder; several are summed (see "
                                  "--reward_weights); docs/stages.md", group="stage", nargs="+")
    reward_weights: list[float] | None = opt(None, "grpo: one weight ≥ 0 per --reward_funcs entry (default: 1 each); "
                                             "a penalty is a reward that returns negative numbers", group="stage",
                                             range=NON_NEGATIVE)
    num_generations: int = opt(4, "grpo: completions sampled per prompt (the group each is compared with)",
                               group="stage", range=POSITIVE_INT)
    max_completion_length: int = opt(128, "grpo: most tokens per sampled completion", group="stage",
                                     range=POSITIVE_INT)
    temperature: float = like(DecodingFlags, "temperature", 1.0)  # grpo samples; 1.0 is TRL's
    loss_type: str = opt("dapo", "grpo: TRL's loss: dapo (tokens of the whole batch), grpo (per-sequence mean), "
                         "dr_grpo, bnpo, cispo, sapo", group="stage", choices=GRPO_LOSSES)
    scale_rewards: str = opt("group", "grpo: divide advantages by the reward spread of the group, the batch, or "
                             "none (Dr. GRPO)", group="stage", choices=("group", "batch", "none"))


def check(args: Any) -> None:
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


def _trainer_class(stage: StageSpec) -> type:
    from trl import GRPOTrainer

    from unift.compat.trl_grpo import GRPOOverrides
    from unift.train.checkpoints import AtomicCheckpoints
    from unift.train.hooks import UniftHooks

    return type("UniftGRPOTrainer", (GRPOOverrides, UniftHooks, AtomicCheckpoints, GRPOTrainer),
                {"stage": stage, "__module__": __name__})


class RewardModelScore:
    """A --stage rm run as a reward: its score of the prompt's ids followed by the completion's, the way it
    was trained (prompt and answer ids together, the answer ending with the template's end of turn)."""

    def __init__(self, folder: str, prompt_ids: dict[str, list[int]], end_ids: list[int], device: str, plan) -> None:
        from unift.loader import load

        loaded = load(folder, device=device, dtype=plan.compute, allow_reward=True)
        self.model = loaded.model.eval().requires_grad_(False)
        self.pad = loaded.tokenizer.pad_token_id
        self.prompt_ids, self.end_ids = prompt_ids, end_ids
        self.__name__ = f"reward_model:{folder}"

    def __call__(self, prompts: list, completions: list, completion_ids: list, **_: Any) -> list[float]:
        import torch

        rows = []
        for prompt, ids in zip(prompts, completion_ids, strict=True):
            ids = list(ids)
            if not ids or ids[-1] not in self.end_ids:
                ids = ids + self.end_ids[:1]
            rows.append(self.prompt_ids[prompt] + ids)
        width = max(map(len, rows))
        batch = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, row in enumerate(rows):
            batch[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            scores = self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits[:, 0]
        return scores.float().cpu().tolist()


def end_of_turn_ids(template: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and the template's end-of-turn token (when it is one token): where answers end."""
    from unift.data.templates import end_of_turn

    marker = end_of_turn(template, tokenizer)
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    ids = [*([marker_ids[0]] if len(marker_ids) == 1 else []), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def vllm_settings(device: str) -> dict[str, Any]:
    """Sampling through vLLM in the training process where it is installed and the run is on a GPU;
    transformers' generate otherwise."""
    import importlib.util

    if device.startswith("cuda") and importlib.util.find_spec("vllm") is not None:
        return {"use_vllm": True, "vllm_mode": "colocate"}
    return {}


def build(stage: StageSpec, args: Any, settings: dict, prepared: PreparedRun, model, callbacks: list | None):
    """The TRL GRPOTrainer of a run, with its rewards, on unift's prompt rows."""
    from peft import PeftModel
    from trl import GRPOConfig

    from unift import compat
    from unift.train.rewards import is_reward_model, reward_function

    # TRL's fused output head scores every position on a CPU (prompt and padding too): the completion's only
    compat.trl_stages.score_answer_tokens_only()
    rows = [*prepared.train, *(prepared.val or [])]
    prompt_ids = {row["prompt"]: row["prompt_ids"] for row in rows}
    ends = end_of_turn_ids(prepared.template, prepared.tokenizer)
    model.generation_config.eos_token_id = ends  # TRL stops and masks completions at these
    model.generation_config.pad_token_id = prepared.tokenizer.pad_token_id
    funcs = [RewardModelScore(spec, prompt_ids, ends, prepared.device, prepared.plan) if is_reward_model(spec)
             else reward_function(spec) for spec in args.reward_funcs]
    config = GRPOConfig(
        **settings, beta=stage.beta_for(args),
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature, loss_type=args.loss_type, scale_rewards=args.scale_rewards,
        reward_weights=args.reward_weights, shuffle_dataset=True, log_completions=False,
        # training turns the model's cache off (model.config.use_cache); sampling needs it (measured: without
        # it each new token recomputes the whole sequence)
        generation_kwargs={"use_cache": True},
        # the sampled answers' log-probabilities, the policy's and the reference's must be of one model:
        # with dropout on, a run started from an adapter trained with dropout measured a KL of 0.98 before
        # any update (TRL leaves dropout on by default)
        disable_dropout=True,
        **vllm_settings(prepared.device),
        pad_to_multiple_of=prepared.shape_multiple if prepared.shape_multiple > 1 else None,
    )
    trainer = _trainer_class(stage)(
        model=model, reward_funcs=funcs, args=config, train_dataset=prepared.train,
        eval_dataset=prepared.val or None, processing_class=prepared.tokenizer, callbacks=callbacks,
        method=prepared.method,
    )
    trainer.prompt_ids = prompt_ids
    if isinstance(model, PeftModel) and not args.adapter_dir:
        compat.trl_stages.drop_reference_adapter(model)  # the reference is the base, as for dpo
    return trainer


# GRPO's gradient from a few sampled groups is mostly noise, which Adam's per-weight scaling turns into
# full-size steps on every weight (measured on arith from a 56% SFT adapter: AdamW at 1e-4 to 5e-4 kept 56%
# or fell to 29-38%, its answers' perplexity rising); plain SGD moves along the gradient, its step bounded
# by the gradient clipping, and raised exact match to 63-68% in 40 steps (docs/stages.md)
GRPO_OPTIMIZER = {"optim": "sgd", "learning_rate": 0.3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
register_stage(StageSpec(
    "grpo", "group relative policy optimisation (TRL's GRPO): sampled answers scored by reward functions "
    "(--reward_funcs), no reference unless --pref_beta > 0", "prompts", order=6, build=build, flags=GrpoFlags,
    beta=0.0, trl_trainer="GRPOTrainer", check=check, optimizer=GRPO_OPTIMIZER))
