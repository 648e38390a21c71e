"""The preference stages' trainers (dpo, orpo, simpo, kto, rm in unift.train.stages): TRL's DPOTrainer,
KTOTrainer and RewardTrainer with unift's hooks mixed in, on rows unift tokenized itself
(unift.data.preference)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from unift.train.prepared import PreparedRun
from unift.train.stages.registry import StageSpec


def _trainer_class(stage: StageSpec) -> type:
    import trl

    from unift.compat.trl_preference import PreferenceOverrides
    from unift.train.checkpoints import AtomicCheckpoints
    from unift.train.hooks import UniftHooks

    base = getattr(trl, stage.trl_trainer)
    return type(f"Unift{stage.name.upper()}Trainer", (PreferenceOverrides, UniftHooks, AtomicCheckpoints, base),
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
    return config(**{**settings, "beta": stage.beta_for(args), **stage.settings(args)}, max_length=None, dataset_num_proc=None,
                  precompute_ref_log_probs=not stage.reference, pad_to_multiple_of=multiple if multiple > 1 else None)


def _separate_reference(path: str, prepared: PreparedRun):
    """--ref_model: a model folder, or a run folder (its adapter folded in), loaded like the base."""
    from pathlib import Path

    from unift.loader import load

    is_run = (Path(path) / "adapter_config.json").exists()
    loaded = load(path if is_run else None, base_model=None if is_run else path, model_type=prepared.spec.name,
                  device=prepared.device, dtype=prepared.plan).model
    if hasattr(loaded, "merge_and_unload"):
        loaded = loaded.merge_and_unload()
    return loaded.eval().requires_grad_(False)


def preference_trainer(stage: StageSpec, args: Any, settings: dict, prepared: PreparedRun, model, callbacks: list | None):
    """The TRL trainer of a preference stage, on unift's rows, with unift's hooks."""
    from peft import PeftModel

    from unift import compat

    compat.trl_stages.score_answer_tokens_only()
    config = _config(stage, settings, args, prepared.shape_multiple)
    adapter = isinstance(model, PeftModel)
    reference = None
    if stage.reference and args.ref_model:
        reference = _separate_reference(args.ref_model, prepared)
    elif stage.reference and not adapter:  # full or freeze: the starting weights, frozen, are the reference
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns that "ref" is part of "prefix_tuning_" when TRL copies a prefix adapter; the copy goes
        warnings.filterwarnings("ignore", message="Adapter name 'ref' should not be contained")
        trainer = _trainer_class(stage)(
            model=model, args=config, train_dataset=prepared.train, eval_dataset=prepared.val or None,
            processing_class=prepared.tokenizer, callbacks=callbacks, method=prepared.method,
            **({} if stage.reward else {"ref_model": reference}),
        )
    if stage.configure is not None:
        stage.configure(trainer, args)
    if adapter and not args.adapter_dir:  # with --adapter_dir, TRL's copy of it is the reference
        compat.trl_stages.drop_reference_adapter(model)
    if stage.reward and prepared.plan.compute == "fp32":
        # TRL stores a quantized model's trainable weights in bf16 (QLoRA's recipe); LoRA layers cast their
        # input, but the new scoring head is a plain linear layer that meets fp32 hidden states
        import torch

        for name, param in model.named_parameters():
            if param.requires_grad and param.dtype == torch.bfloat16 and ".score." in f".{name}":
                param.data = param.data.float()
    return trainer
