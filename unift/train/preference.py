"""The preference stages' trainers (dpo, orpo, simpo, kto, rm in unift.train.stages): TRL's DPOTrainer,
KTOTrainer and RewardTrainer with unift's hooks mixed in, on rows unift tokenized itself
(unift.data.preference)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from unift.train.stages.registry import StageSpec


class PreferenceHooks:
    """Mixed into TRL's trainers: unift's rows are already tokenized, the reference is the base model, and
    orpo/simpo compute their loss (StageSpec.pair_loss) on DPOTrainer's batches."""

    stage: StageSpec
    simpo_gamma: float = 0.5

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.stage.reward:  # the reward model scores whole sequences: prompt and answer together
            def join(row: dict) -> dict:
                return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                        "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}

            return dataset.map(join, remove_columns=["prompt_ids"])
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
        chosen_sums, chosen_counts = sums.chunk(2)[0], counts.chunk(2)[0]
        loss, chosen_rewards, rejected_rewards = self.stage.pair_loss(self, chosen, rejected, chosen_sums,
                                                                      chosen_counts)
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        loss = loss.to(torch.float32) if loss.dtype != torch.float32 else loss
        return (loss, outputs) if return_outputs else loss


def _trainer_class(stage: StageSpec) -> type:
    import trl

    from unift.train.checkpoints import AtomicCheckpoints
    from unift.train.hooks import UniftHooks

    base = getattr(trl, stage.trl_trainer)
    return type(f"Unift{stage.name.upper()}Trainer", (PreferenceHooks, UniftHooks, AtomicCheckpoints, base),
                {"stage": stage, "__module__": __name__})


def _config(stage: StageSpec, settings: dict, args: Any, multiple: int):
    import trl

    config = getattr(trl, stage.trl_trainer.replace("Trainer", "Config"))
    if stage.reward:
        return config(**settings, max_length=None, dataset_num_proc=None,
                            pad_to_multiple_of=multiple if multiple > 1 else None)
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
            model=model, args=config, train_dataset=ready["train"], eval_dataset=ready["val"] or None,
            processing_class=ready["tokenizer"], callbacks=callbacks, method=ready["method"],
            **({} if stage.reward else {"ref_model": reference}),
        )
    if stage.configure is not None:
        stage.configure(trainer, args)
    if adapter and not args.adapter_dir:  # with --adapter_dir, TRL's copy of it is the reference
        compat.trl_stages.drop_reference_adapter(model)
    if stage.reward and ready["plan"].compute == "fp32":
        # TRL stores a quantized model's trainable weights in bf16 (QLoRA's recipe); LoRA layers cast their
        # input, but the new scoring head is a plain linear layer that meets fp32 hidden states
        import torch

        for name, param in model.named_parameters():
            if param.requires_grad and param.dtype == torch.bfloat16 and ".score." in f".{name}":
                param.data = param.data.float()
    return trainer
