"""The Trainer unift trains with: transformers' Trainer plus atomic checkpoints, token counting, the speed in
the logs, and the PEFT method's hook right after each optimizer step."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from unift.models.runcard import RunCard
from unift.runtime import world_size
from unift.train.checkpoints import AtomicCheckpoints
from unift.train.engines import deepspeed_setting
from unift.train.hooks import UniftHooks
from unift.train.optim import low_rank_targets
from unift.train.progress import progress_callback, report_targets


class UniftTrainer(UniftHooks, AtomicCheckpoints, Trainer):
    """Supervised fine-tuning."""


def supervised_trainer(settings: dict, ready: dict[str, Any], model, callbacks: list | None) -> UniftTrainer:
    """--stage sft's trainer (unift.train.stages.sft)."""
    from transformers import TrainingArguments

    return UniftTrainer(
        model=model, args=TrainingArguments(**settings), train_dataset=ready["train"],
        eval_dataset=ready["val"] or None, data_collator=ready["collator"], processing_class=ready["tokenizer"],
        callbacks=callbacks, method=ready["method"],
    )


def build_trainer(args: Any, ready: dict[str, Any], model, collator, card: RunCard,
                  callbacks: list | None = None):
    """The Trainer for a run: TrainingArguments from the flags, unift's progress line instead of tqdm's,
    and the run card written into every checkpoint before it appears."""
    from transformers.trainer_callback import ProgressCallback

    device = ready["device"]
    dtype = ready["plan"].compute
    on_gpu = device != "cpu"
    save_strategy = "steps" if args.save_steps else "epoch"
    has_val = len(ready["val"]) > 0
    optim = args.optim or ready["method"].optimizer_name()  # default: paged AdamW for QLoRA on GPU
    settings = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_gpu_train_batch_size,
        per_device_eval_batch_size=args.per_gpu_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=args.weight_decay,
        optim="adamw_torch" if optim == "badam" else optim,  # badam is unift's (below), AdamW inside
        optim_args=args.optim_args,
        optim_target_modules=low_rank_targets(args, model),  # GaLore, APOLLO: the layers they project
        neftune_noise_alpha=args.neftune_noise_alpha,
        logging_steps=max(1, args.logging_steps),
        save_strategy=save_strategy,
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        eval_strategy=save_strategy if has_val else "no",
        eval_steps=args.save_steps if has_val and args.save_steps else None,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=not on_gpu,
        seed=args.seed,
        report_to=report_targets(args.report_to, args.output_dir) or "none",
        deepspeed=deepspeed_setting(args),
        gradient_checkpointing=args.gradient_checkpointing,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        prediction_loss_only=True,  # evaluation reports the loss; gathering every logit would cost GBs
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        disable_tqdm=False,
        logging_first_step=True,
    )
    stage = ready["stage"]
    trainer = stage.build(stage, args, settings, {**ready, "collator": collator}, model, callbacks)
    if optim == "badam":
        from unift.train.badam import badam_optimizer

        # Set on the built trainer, so every stage's trainer (unift's or TRL's) builds it in create_optimizer.
        trainer.optimizer_cls_and_kwargs = badam_optimizer(args)
    # Every checkpoint-N folder gets the run card before it appears, so generate/eval/merge can use it.
    trainer.before_publish = [card.save]
    trainer.progress = progress_callback(lambda: trainer.tokens_seen * world_size())
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(trainer.progress)
    return trainer
