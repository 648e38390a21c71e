"""Training: from TrainArgs to a self-describing run folder (adapter, tokenizer, unift_run.json,
metrics.json), in named phases: start the process, prepare the data (unift.train.prepared), decide the
dtypes, load and wrap the model, build the trainer, train, save, report (unift.train.report)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from unift.accel import parse_optimizations, prepare_training
from unift.accel.storage import release_freed_memory
from unift.allocator import in_use as allocator_in_use
from unift.data.collate import PackingCollator, PaddingCollator
from unift.errors import UniftError
from unift.loader import load
from unift.models.devices import training_device
from unift.models.dtypes import training_plan
from unift.models.runcard import default_run_dir
from unift.peft import trainable_parameters, wrap_model
from unift.runtime import is_main_process, world_size
from unift.train.args import TrainArgs
from unift.train.checkpoints import StopOnSignal, check_output_dir, checkpoint_bytes, clear_staging
from unift.train.engines import (
    engine_optimizations,
    prepare_engine,
    prepare_process,
    save_adapter,
    scaling_record,
)
from unift.train.plan import check_memory
from unift.train.prepared import PreparedData, PreparedRun, prepare
from unift.train.report import announce, run_card, write_metrics
from unift.train.resume import ResumePlan, check_shapes, plan_resume, prepare_resume
from unift.train.scaling import Scaling, decide_scaling
from unift.train.stages import stage_levers
from unift.train.trainer import build_trainer

log = logging.getLogger("unift")

__all__ = ["PreparedData", "PreparedRun", "TrainResult", "prepare", "train"]


def default_output_dir(args: TrainArgs) -> str:
    return str(default_run_dir(args.model_type, args.data, args.peft_type))


def total_optimizer_steps(args: TrainArgs, n_train: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * world_size()
    return max(1, math.ceil(math.ceil(n_train / per_step) * args.epochs))


def resolve_resume(args: TrainArgs) -> str | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            raise UniftError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder")
        return args.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last is None:
        raise UniftError(f"--resume_from_checkpoint: no checkpoint-* folder in {args.output_dir}")
    return last


@dataclass
class TrainResult:
    output_dir: Path
    model: Any  # the trained PeftModel, still in memory
    metrics: dict[str, Any]


def start_process(args: TrainArgs) -> Scaling:
    """Before any data or weights: the engine (decided and checked), the run folder, the seed, the
    allocator's settings."""
    from transformers import set_seed

    args.output_dir = args.output_dir or default_output_dir(args)
    scaling = decide_scaling(args)
    prepare_process(scaling)
    check_output_dir(args.output_dir)  # before anything loads: a bad folder costs seconds, not a run
    set_seed(args.seed)
    if args.release_memory and allocator_in_use():
        log.info("--release_memory tunes glibc's malloc; %s returns freed memory by itself", allocator_in_use())
    elif args.release_memory and not release_freed_memory():
        log.warning("warning: --release_memory needs glibc's malloc; this C library's keeps freed memory")
    return scaling


def decide_dtypes(args: TrainArgs, data: PreparedData, device: str,
                  scaling: Scaling) -> tuple[PreparedRun, tuple[str, ...], dict]:
    """The run's dtypes, decided once (the card records these, not what the loaded model reports), and the
    speed levers the engine and the stage take (with why the others are left out)."""
    levers = engine_optimizations(args, scaling, parse_optimizations(args.optimizations))
    wanted, not_for_stage = stage_levers(data.stage, levers)
    plan = training_plan(args.compute_dtype, device, quantization_bit=args.quantization_bit,
                         half_base="base_dtype" in wanted, sharded=scaling.sharded,
                         trains_weights=data.method.holds_model)
    return PreparedRun.of(data, device=device, scaling=scaling, plan=plan), wanted, not_for_stage


def load_and_wrap(args: TrainArgs, prepared: PreparedRun, resuming: ResumePlan | None) -> tuple[Any, SimpleNamespace]:
    """The base model in the plan's dtypes, wrapped by the PEFT method (further training --adapter_dir's
    adapter where given), and the options the method read (the flags and the schedule's length)."""
    model = load(base_model=prepared.path, model_type=prepared.spec.name, template=prepared.template,
                 tokenizer=prepared.tokenizer, trust_remote_code=args.trust_remote_code, device=prepared.device,
                 dtype=prepared.plan, reward=prepared.stage.reward, rope_scaling=args.rope_scaling,
                 attn_implementation=args.attn_implementation).model
    model.config.use_cache = False
    # Methods may need the schedule length (AdaLoRA's total_step); the options carry it beside the flags.
    options = SimpleNamespace(**asdict(args), total_steps=total_optimizer_steps(args, len(prepared.train)))
    # --adapter_dir: its adapter trains further (a full/freeze run folder was loaded as the model itself)
    method = prepared.method
    parent_adapter = args.adapter_dir if args.adapter_dir and not method.holds_model else None
    model = wrap_model(model, method, options, prepared.spec, reward=prepared.stage.reward, adapter_dir=parent_adapter)
    if resuming is not None:
        check_shapes(resuming, model)  # another --lora_r or other targets: one line, before anything is logged
    return model, options


def with_batches(prepared: PreparedRun, accel: Any) -> PreparedRun:
    """The batch shape the levers chose: the multiple rows are padded to, and the collator that does it."""
    pad_id = prepared.tokenizer.pad_token_id
    collator = (PackingCollator(pad_id, accel.shape_multiple) if accel.padding_free
                else PaddingCollator(pad_id, accel.shape_multiple))
    return replace(prepared, shape_multiple=accel.shape_multiple, collator=collator)


def save_and_report(args: TrainArgs, prepared: PreparedRun, trainer: Any, model: Any, result: Any, card: Any,
                    accel: Any, wall: float, resuming: ResumePlan | None, parameters: tuple[int, int]) -> dict[str, Any]:
    """The adapter (or model), tokenizer, run card and metrics in the run folder; the metrics (main process)."""
    out = Path(args.output_dir)
    save_adapter(trainer, model, out, prepared.scaling)  # every rank: sharded engines gather the adapter first (full: the model)
    card.scaling = scaling_record(trainer, resuming.record() if resuming else None)  # every rank: gathers memory
    if not trainer.is_world_process_zero():
        return {}
    prepared.tokenizer.save_pretrained(out)
    card.save(out)
    return write_metrics(out, prepared, trainer, result, card, accel, wall, parameters)


def train(args: TrainArgs, callbacks: list | None = None, probe: Any = None) -> TrainResult:
    """Fine-tune, write the run folder, and return it with the in-memory model and the metrics.
    `callbacks`: extra transformers TrainerCallbacks (tests use them to watch every step). `probe`: --plan's
    (unift.train.probe.Probe): a few steps on the longest examples, timed, and nothing saved."""
    from unift import compat

    compat.apply()
    scaling = start_process(args)
    resume = resolve_resume(args)
    # Before anything counts steps or batches: a checkpoint keeps its global batch (the accumulation adjusts)
    resuming = plan_resume(args, resume, scaling) if resume else None
    device = training_device(args.device)  # a device the machine lacks fails before any work is done
    data = prepare(args)
    prepared, wanted, not_for_stage = decide_dtypes(args, data, device, scaling)
    model, options = load_and_wrap(args, prepared, resuming)
    accel = prepare_training(model, prepared.spec, prepared.method, wanted, device=device.split(":")[0],
                             compute=prepared.plan.compute_dtype, padding_free_asked=args.padding_free,
                             attention_asked=args.attn_implementation)
    trainable, total = trainable_parameters(model)
    if is_main_process():
        check_output_dir(args.output_dir, checkpoint_bytes(trainable, args.save_total_limit))
        clear_staging(args.output_dir)  # what a kill left half-written
        announce(args, prepared, accel, trainable, total, not_for_stage)
    prepared = with_batches(prepared, accel)
    # Before the first step: the predicted peak memory, refused beyond what the machine has unless --force
    found, batches = check_memory(args, prepared, model, accel, options.total_steps)
    if probe is not None:  # --plan: the probe trains a few steps on the run's longest examples
        prepared = probe.attach(prepared, found, batches, accel.padding_free, accel.shape_multiple)
        if prepared is None:
            return TrainResult(Path(args.output_dir), model, {})  # --plan_steps 0: the estimate only
    card = run_card(args, prepared)
    stop = StopOnSignal()
    trainer = build_trainer(args, prepared, model, card, [stop.callback(), *(callbacks or [])])
    prepare_engine(trainer, model, scaling)
    prepare_resume(trainer, model, resuming)  # another engine or world size: the weights from the neutral state
    started = time.perf_counter()
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.uninstall()
        accel.restore()
    compat.trl_stages.drop_reference_adapter(model)  # TRL's frozen copy of the starting adapter is not saved
    wall = time.perf_counter() - started
    out = Path(args.output_dir)
    if stop.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        if trainer.is_world_process_zero():
            log.info("stopped at step %d of %d: %s/checkpoint-%d saved; continue with --resume_from_checkpoint",
                     stop.stopped_at, trainer.state.max_steps, out, stop.stopped_at)
        raise KeyboardInterrupt
    if probe is not None:  # --plan: measured, nothing to keep
        probe.finish()
        return TrainResult(out, model, {})
    metrics = save_and_report(args, prepared, trainer, model, result, card, accel, wall, resuming, (trainable, total))
    return TrainResult(out, model, metrics)
