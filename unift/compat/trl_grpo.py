"""TRL's GRPOTrainer on prompts unift tokenized with the run's template: the private methods unift overrides,
in one mixin (unift.train.stages.grpo builds the trainer class with it)."""

from __future__ import annotations

from typing import Any


class GRPOOverrides:
    """Mixed into TRL's GRPOTrainer: prompts as unift encoded them, tokens counted after generation.
    Overrides two private methods of TRL 1.16's GRPOTrainer: `_tokenize_prompts(prompts)` and
    `_prepare_inputs(generation_batch)`; tests/test_compat.py fails when their signatures change."""

    stage: Any  # the run's unift StageSpec
    prompt_ids: dict[str, list[int]]

    def _tokenize_prompts(self, prompts: list):
        # unift's own ids for the rendered prompts (BOS and piece boundaries as in supervised training);
        # anything else (conversational prompts from a caller) goes through TRL's own tokenization
        if prompts and all(isinstance(p, str) and p in self.prompt_ids for p in prompts):
            return [list(self.prompt_ids[p]) for p in prompts], None, {}
        return super()._tokenize_prompts(prompts)

    def _prepare_inputs(self, generation_batch):
        # Sampling runs on the model unwrapped from accelerate's mixed-precision forward: under the bf16
        # plan the frozen base is bf16 and the adapter fp32, which only autocast reconciles
        with self.accelerator.autocast():
            inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and isinstance(inputs, dict) and "completion_mask" in inputs:
            trained = int(inputs["completion_mask"].sum())
            self.tokens_seen += int(inputs["prompt_mask"].sum()) + trained
            self.tokens_trained += trained
        return inputs
