"""TRL's preference trainers (DPOTrainer, KTOTrainer, RewardTrainer) on rows unift tokenized itself, with the
reference-free losses of orpo and simpo computed on DPOTrainer's batches: the private methods unift
overrides, in one mixin (unift.train.preference builds the trainer classes with it)."""

from __future__ import annotations

from typing import Any


class PreferenceOverrides:
    """Mixed into TRL's trainers: unift's rows are already tokenized, the reference is the base model, and
    orpo/simpo compute their loss (StageSpec.pair_loss) on DPOTrainer's batches. Overrides three private
    methods of TRL 1.16's trainers: `_prepare_dataset(dataset, processing_class, args, dataset_name)` (no
    tokenization: the rows are ids; the reward model's rows joined; KTO's KL rows rotated as TRL does),
    `_precompute_ref_logps(dataset, name, batch_size)` (nothing without a reference) and
    `_compute_loss(model, inputs, return_outputs)` (the reference-free losses); tests/test_compat.py fails
    when their signatures change."""

    stage: Any  # the run's unift StageSpec: reward, reference, pair_loss
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
