"""The Trainer unift trains with: transformers' Trainer plus atomic checkpoints, token counting, the speed in
the logs, and the PEFT method's hook right after each optimizer step."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from unift.models.runcard import RunCard
from unift.options import trainer_fields
from unift.runtime import world_size
from unift.train.checkpoints import AtomicCheckpoints
from unift.train.hooks import UniftHooks
from unift.train.optim import OWN, low_rank_targets
from unift.train.prepared import PreparedRun
from unift.train.progress import progress_callback, report_targets


class UniftTrainer(UniftHooks, AtomicCheckpoints, Trainer):
    """Supervised fine-tuning."""


def supervised_trainer(settings: dict, prepared: PreparedRun, model, callbacks: list | None) -> UniftTrainer:
    """--stage sft's trainer (unift.train.stages.sft)."""
    from transformers import TrainingArguments

    return UniftTrainer(
        model=model, args=TrainingArguments(**settings), train_dataset=prepared.train,
        eval_dataset=prepared.val or None, data_collator=prepared.collator, processing_class=prepared.tokenizer,
        callbacks=callbacks, method=prepared.method,
    )


def build_trainer(args: Any, prepared: PreparedRun, model, card: RunCard,
                  callbacks: list | None = None):
    """The Trainer for a run: TrainingArguments from the flags, unift's progress line instead of tqdm's,
    and the run card written into every checkpoint before it appears."""
    from transformers.trainer_callback import ProgressCallback

    device = prepared.device
    dtype = prepared.plan.compute
    on_gpu = device != "cpu"
    save_strategy = "steps" if args.save_steps else "epoch"
    has_val = len(prepared.val) > 0
    optim = args.optim or prepared.method.optimizer_name()  # default: paged AdamW for QLoRA on GPU
    # The flags that go to TrainingArguments unchanged say so beside their definition (opt(..., trainer=));
    # these are computed from several flags, the run, or fixed for every unift run
    settings = dict(
        trainer_fields(args),
        optim="adamw_torch" if optim in OWN else optim,  # badam, muon: unift's (below), AdamW inside
        optim_target_modules=low_rank_targets(args, model),  # GaLore, APOLLO: the layers they project
        logging_steps=max(1, args.logging_steps),
        save_strategy=save_strategy,
        save_steps=args.save_steps or 500,
        eval_strategy=save_strategy if has_val else "no",
        eval_steps=args.save_steps if has_val and args.save_steps else None,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=not on_gpu,
        report_to=report_targets(args.report_to, args.output_dir) or "none",
        deepspeed=prepared.scaling.trainer_deepspeed(),
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        prediction_loss_only=True,  # evaluation reports the loss; gathering every logit would cost GBs
        disable_tqdm=False,
        logging_first_step=True,
    )
    stage = prepared.stage
    trainer = stage.build(stage, args, settings, prepared, model, callbacks)
    if optim == "badam":
        from unift.train.badam import badam_optimizer

        # Set on the built trainer, so every stage's trainer (unift's or TRL's) builds it in create_optimizer.
        trainer.optimizer_cls_and_kwargs = badam_optimizer(args)
    elif optim == "muon":
        from unift.train.muon import muon_optimizer

        trainer.optimizer_cls_and_kwargs = muon_optimizer(trainer)  # the same way, from the trainer's settings
    # Every checkpoint-N folder gets the run card before it appears, so generate/eval/merge can use it.
    trainer.before_publish = [card.save]
    trainer.progress = progress_callback(lambda: trainer.tokens_seen * world_size())
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(trainer.progress)
    return trainer
