"""What every unift trainer adds to transformers' Trainer or TRL's, whatever the stage: token counts, the
speed in the logs, and the PEFT method's hook right after each optimizer step."""

from __future__ import annotations

from typing import Any

from unift.data.collate import batch_tokens
from unift.peft import MethodSpec


class UniftHooks:
    """What every unift trainer adds to transformers' (or TRL's) Trainer, whatever the stage.
    `method`: the run's MethodSpec, whose after_optimizer_step runs right after optimizer.step(), before
    the gradients are zeroed (AdaLoRA reallocates its rank budget there; a TrainerCallback runs too late)."""

    def __init__(self, *args: Any, method: MethodSpec | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.tokens_seen = 0  # real (non-pad) tokens of training batches, this process, this session
        self.tokens_trained = 0  # of which tokens with a label
        self.progress: Any = None  # unift's progress callback: its rate goes into the logs

    def training_step(self, model, inputs, *args, **kwargs):
        if isinstance(inputs, dict):  # GRPO's inputs are raw rows: it counts its tokens after generation
            real, trained = batch_tokens(inputs)
            self.tokens_seen += real
            self.tokens_trained += trained
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.progress is not None:  # trackers (tensorboard, wandb) get the speed too
            logs["tokens_per_second"] = round(self.progress.rate(), 1)
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        step_hook = self.method.after_optimizer_step if self.method else None
        if step_hook is not None and not getattr(optimizer, "_unift_hooked", False):
            def hook(_opt, _args, _kwargs):
                step_hook(self.model_wrapped, self.state.global_step)

            optimizer.register_step_post_hook(hook)
            optimizer._unift_hooked = True
        return optimizer
