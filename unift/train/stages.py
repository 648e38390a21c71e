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
The reference of dpo and kto is the base with the adapter switched off: no second copy of the weights.
TRL copies a PEFT adapter as a "ref" adapter; unift deletes that copy, so the reference is the base model
itself (for LoRA, whose update starts at zero, the same model; for other methods the base without them).
A full or freeze run has no adapter to switch off, so it gets a frozen copy of the model.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError

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
    flags: tuple[str, ...] = ()  # the stage flags it reads
    settings: Callable[[Any], dict] = lambda args: {}  # TRL config fields from the flags
    unsupported: dict[str, str] = field(default_factory=dict)  # peft_type -> why not


# Methods no preference stage can train, and why (measured with TRL 1.16, peft 0.21)
PREFERENCE_REFUSALS = {
    "adalora": "TRL's preference trainers add a copy of the adapter as the reference, and AdaLoRA allows one "
               "trainable adapter only",
}

STAGE_FLAGS = ("pref_beta", "pref_loss", "simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight", "ref_model")

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


register_stage(StageSpec("sft", "supervised fine-tuning on instruction data", "sft"))
register_stage(StageSpec(
    "dpo", "direct preference optimisation (TRL's DPO losses, --pref_loss) over chosen/rejected pairs", "pairs",
    beta=0.1, reference=True, flags=("pref_beta", "pref_loss", "ref_model"), unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["dpo"]), "loss_type": [args.pref_loss]}))
register_stage(StageSpec(
    "orpo", "odds-ratio preference optimisation: the chosen answer's loss plus an odds-ratio term, no reference",
    "pairs", beta=0.1, flags=("pref_beta",), unsupported=PREFERENCE_REFUSALS, settings=lambda args: {"beta": _beta(args, STAGES["orpo"])}))
register_stage(StageSpec(
    "simpo", "SimPO: length-normalised log-probability margin with a target gap (--simpo_gamma), no reference",
    "pairs", beta=2.0, flags=("pref_beta", "simpo_gamma"), unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["simpo"])}))
register_stage(StageSpec(
    "kto", "Kahneman-Tversky optimisation over answers labelled desirable or not (TRL's KTO)", "unpaired",
    beta=0.1, reference=True, flags=("pref_beta", "kto_desirable_weight", "kto_undesirable_weight", "ref_model"),
    unsupported=PREFERENCE_REFUSALS,
    settings=lambda args: {"beta": _beta(args, STAGES["kto"]), "desirable_weight": args.kto_desirable_weight,
                           "undesirable_weight": args.kto_undesirable_weight,
                           # KTO pairs each answer with its batch neighbour's prompt for the KL term (in
                           # _prepare_dataset): the batches must be the dataset's order, already shuffled
                           "train_sampling_strategy": "sequential"}))


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
    reason = stage.unsupported.get(args.peft_type)
    if reason:
        raise UniftError(f"--stage {stage.name} does not work with --peft_type {args.peft_type}: {reason}")
    if stage.kind != "sft" and args.streaming:
        raise UniftError(f"--stage {stage.name} reads its data whole; --streaming is for supervised data")


def stage_levers(stage: StageSpec, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The speed levers a stage can take, and why the others are left out."""
    if stage.kind == "sft":
        return wanted, {}
    return (tuple(w for w in wanted if w not in FORWARD_LEVERS),
            {w: FORWARD_LEVERS[w] for w in wanted if w in FORWARD_LEVERS})


# ---- the trainers ---------------------------------------------------------------------------------


class PreferenceHooks:
    """Mixed into TRL's trainers: unift's rows are already tokenized, the reference is the base model, and
    orpo/simpo compute their loss on DPOTrainer's batches."""

    stage: StageSpec
    simpo_gamma: float = 0.5

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if getattr(self, "calculate_KL", False):  # KTO: each answer against its batch neighbour's prompt,
            size = args.per_device_train_batch_size  # the rotation TRL applies to its own rows

            def rotate(batch: dict) -> dict:
                return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

            dataset = dataset.map(rotate, batched=True, batch_size=size)
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return super()._precompute_ref_logps(dataset, name, batch_size) if self.stage.reference else dataset

    def _compute_loss(self, model, inputs, return_outputs):
        if self.stage.reference:
            return super()._compute_loss(model, inputs, return_outputs)
        import torch

        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        shift = mask[..., 1:]
        per_token = outputs.log_probs[:, -shift.size(1):]  # prompt-learning methods prepend virtual tokens
        sums, counts = (per_token * shift).sum(1), shift.sum(1).clamp(min=1)
        chosen, rejected = (sums / counts).chunk(2)
        if self.stage.name == "orpo":
            from trl.experimental.orpo import ORPOTrainer

            ratio, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(self, chosen, rejected)
            chosen_sums, chosen_counts = sums.chunk(2)[0], counts.chunk(2)[0]
            loss = -(chosen_sums.sum() / chosen_counts.sum()) - ratio.mean()  # chosen NLL minus the odds term
        else:
            from trl.experimental.cpo import CPOTrainer

            losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(self, chosen, rejected)
            loss = losses.mean()
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        loss = loss.to(torch.float32) if loss.dtype != torch.float32 else loss
        return (loss, outputs) if return_outputs else loss


def _trainer_class(stage: StageSpec) -> type:
    from trl import DPOTrainer, KTOTrainer

    from unift.train.checkpoints import AtomicCheckpoints
    from unift.train.trainer import UniftHooks

    base = KTOTrainer if stage.kind == "unpaired" else DPOTrainer
    return type(f"Unift{stage.name.upper()}Trainer", (PreferenceHooks, UniftHooks, AtomicCheckpoints, base),
                {"stage": stage, "__module__": __name__})


def _config(stage: StageSpec, settings: dict, args: Any, multiple: int):
    from trl import DPOConfig, KTOConfig

    config = KTOConfig if stage.kind == "unpaired" else DPOConfig
    # unift tokenized and cut the rows already (--cutoff_len); TRL must not cut them again. Without a
    # reference, "precomputed" reference log-probs keep TRL from loading a reference model (see
    # PreferenceHooks._precompute_ref_logps: nothing is computed).
    # Batches padded to a multiple of `multiple` tokens, as unift's collators do: a CPU's matmul library
    # builds a kernel for every new shape (measured on DPO, 135M, CPU: 31 s a step at every width, 5 s at
    # multiples of 32)
    return config(**{**settings, **stage.settings(args)}, max_length=None, dataset_num_proc=None,
                  precompute_ref_log_probs=not stage.reference, pad_to_multiple_of=multiple if multiple > 1 else None)


def _separate_reference(path: str, ready: dict):
    """--ref_model: a model folder, or a run folder (its adapter folded in), loaded like the base."""
    from pathlib import Path

    from unift.loader import load

    is_run = (Path(path) / "adapter_config.json").exists()
    loaded = load(path if is_run else None, base_model=None if is_run else path, model_type=ready["spec"].name,
                  device=ready["device"], dtype=ready["plan"]).model
    if hasattr(loaded, "merge_and_unload"):
        loaded = loaded.merge_and_unload()
    return loaded.eval().requires_grad_(False)


def preference_trainer(stage: StageSpec, args: Any, settings: dict, ready: dict, model, callbacks: list | None):
    """The TRL trainer of a preference stage, on unift's rows, with unift's hooks."""
    from peft import PeftModel

    from unift import compat

    compat.trl_stages.score_answer_tokens_only()
    config = _config(stage, settings, args, ready.get("shape_multiple", 1))
    adapter = isinstance(model, PeftModel)
    reference = None
    if stage.reference and args.ref_model:
        reference = _separate_reference(args.ref_model, ready)
    elif stage.reference and not adapter:  # full or freeze: the starting weights, frozen, are the reference
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns that "ref" is part of "prefix_tuning_" when TRL copies a prefix adapter; the copy goes
        warnings.filterwarnings("ignore", message="Adapter name 'ref' should not be contained")
        trainer = _trainer_class(stage)(
            model=model, ref_model=reference, args=config, train_dataset=ready["train"],
            eval_dataset=ready["val"] or None, processing_class=ready["tokenizer"], callbacks=callbacks,
            method=ready["method"],
        )
    if not stage.reference:  # what CPOTrainer.cpo_loss reads
        trainer.loss_type, trainer.simpo_gamma, trainer.label_smoothing, trainer.alpha = \
            "simpo", args.simpo_gamma, 0.0, 0.0  # alpha 0: no AlphaPO reward transform
    if adapter:
        compat.trl_stages.drop_reference_adapter(model)
    return trainer
