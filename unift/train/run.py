"""Training: build tokenizer, data, model and PEFT wrapper from TrainArgs, run transformers' Trainer,
and leave a self-describing run folder (adapter, tokenizer, unift_run.json, metrics.json)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from unift.accel import parse_optimizations, prepare_training
from unift.accel.storage import release_freed_memory
from unift.allocator import in_use as allocator_in_use
from unift.allocator import log_line as allocator_log_line
from unift.data import (
    DataOptions,
    build_datasets,
    cutoff_summary,
    load_sources,
    resolve_template,
    template_definition,
)
from unift.data.collate import PackingCollator, PaddingCollator
from unift.data.template_parity import parity_at_start
from unift.errors import UniftError
from unift.loader import load
from unift.models import load_tokenizer
from unift.models.devices import training_device
from unift.models.dtypes import training_plan
from unift.models.loading import resolve_model_path
from unift.models.overrides import scaling_of
from unift.models.runcard import METRICS, RunCard, default_run_dir
from unift.options import command_line
from unift.peft import trainable_parameters, wrap_model
from unift.runtime import is_main_process, library_versions, peak_rss_mib, world_size, write_json_atomic
from unift.train.args import TrainArgs
from unift.train.checkpoints import (
    StopOnSignal,
    check_output_dir,
    checkpoint_bytes,
    clear_staging,
)
from unift.train.engines import (
    engine_optimizations,
    prepare_engine,
    prepare_process,
    save_adapter,
    scaling_record,
)
from unift.train.parent import parent_record
from unift.train.plan import check_memory
from unift.train.progress import LOSS_PLOT, plot_losses, reward_history
from unift.train.resume import check_shapes, plan_resume, prepare_resume
from unift.train.scaling import check_engine, describe_batch, sharded_quantized_storage
from unift.train.stages import get_stage, stage_levers
from unift.train.trainer import build_trainer

log = logging.getLogger("unift")


def default_output_dir(args: TrainArgs) -> str:
    return str(default_run_dir(args.model_type, args.data, args.peft_type))


def prepare(args: TrainArgs) -> dict[str, Any]:
    """Everything before the model: validates data first so bad input fails before any weights load."""
    spec, method = args.spec, args.method  # the pair was checked when the arguments were built
    # A stream has no length of its own: it reports the rows the run will consume.
    stream_length = max(0, args.max_steps) * args.per_gpu_train_batch_size * args.gradient_accumulation_steps
    stage = get_stage(args.stage)
    options = DataOptions.from_args(args, stream_length=stream_length * world_size(), kind=stage.kind)
    sources = load_sources(options)  # every record validated here, before the tokenizer or model loads
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    template = resolve_template(args.template, spec.template, tokenizer)
    # every rank checks (strict stops them all); the main one says it
    parity = parity_at_start(template, tokenizer, getattr(args, "template_check", "report"))
    if parity and is_main_process():
        log.info("%s", parity)
    data = build_datasets(sources, template, tokenizer, options)
    return {"spec": spec, "method": method, "stage": stage, "path": path, "tokenizer": tokenizer, "template": template,
            "train": data.train, "val": data.val, "stats": data.stats}


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


def train(args: TrainArgs, callbacks: list | None = None, probe: Any = None) -> TrainResult:
    """Fine-tune, write the run folder, and return it with the in-memory model and the metrics.
    `callbacks`: extra transformers TrainerCallbacks (tests use them to watch every step). `probe`: --plan's
    (unift.train.probe.Probe): a few steps on the longest examples, timed, and nothing saved."""
    from transformers import set_seed

    from unift import compat

    compat.apply()

    args.output_dir = args.output_dir or default_output_dir(args)
    check_engine(args)
    prepare_process(args)
    check_output_dir(args.output_dir)  # before anything loads: a bad folder costs seconds, not a run
    set_seed(args.seed)
    if args.release_memory and allocator_in_use():
        log.info("--release_memory tunes glibc's malloc; %s returns freed memory by itself", allocator_in_use())
    elif args.release_memory and not release_freed_memory():
        log.warning("warning: --release_memory needs glibc's malloc; this C library's keeps freed memory")
    resume = resolve_resume(args)
    # Before anything counts steps or batches: a checkpoint keeps its global batch (the accumulation adjusts)
    resuming = plan_resume(args, resume) if resume else None
    device = training_device(args.device)  # a device the machine lacks fails before any work is done
    ready = prepare(args)
    spec, method = ready["spec"], ready["method"]
    ready["device"] = device
    bits = args.quantization_bit  # the method's own width, or the flag's (normalised by check_args)
    wanted, not_for_stage = stage_levers(ready["stage"], engine_optimizations(args, parse_optimizations(args.optimizations)))
    # The run's dtypes, decided once: the card records these, not what the loaded model reports
    plan = training_plan(args.compute_dtype, device, quantization_bit=bits, half_base="base_dtype" in wanted,
                         sharded=sharded_quantized_storage(args), trains_weights=method.holds_model)
    ready["plan"] = plan
    dtype, base_dtype = plan.compute, plan.storage
    model = load(base_model=ready["path"], model_type=spec.name, template=ready["template"],
                 tokenizer=ready["tokenizer"], trust_remote_code=args.trust_remote_code, device=device,
                 dtype=plan, reward=ready["stage"].reward, rope_scaling=args.rope_scaling,
                 attn_implementation=args.attn_implementation).model
    model.config.use_cache = False
    # Methods may need the schedule length (AdaLoRA's total_step); the options carry it beside the flags.
    options = SimpleNamespace(**asdict(args), total_steps=total_optimizer_steps(args, len(ready["train"])))
    # --adapter_dir: its adapter trains further (a full/freeze run folder was loaded as the model itself)
    parent_adapter = args.adapter_dir if args.adapter_dir and not method.holds_model else None
    model = wrap_model(model, method, options, spec, reward=ready["stage"].reward, adapter_dir=parent_adapter)
    if resuming is not None:
        check_shapes(resuming, model)  # another --lora_r or other targets: one line, before anything is logged
    accel = prepare_training(model, spec, method, wanted, device=device.split(":")[0],
                             compute=plan.compute_dtype, padding_free_asked=args.padding_free,
                             attention_asked=args.attn_implementation)
    trainable, total = trainable_parameters(model)
    stats = ready["stats"]
    if is_main_process():
        check_output_dir(args.output_dir, checkpoint_bytes(trainable, args.save_total_limit))
        clear_staging(args.output_dir)  # what a kill left half-written
        log.info(
            "%s%s (%s) + %s: %s trainable of %s parameters (%.3f%%); %d train / %d val examples "
            "(%d truncated to %d tokens); template %s; compute %s; %s",
            "" if args.stage == "sft" else f"--stage {args.stage}: ", ready["path"], spec.name, method.name,
            f"{trainable:,}", f"{total:,}", 100 * trainable / total,
            len(ready["train"]), len(ready["val"]), stats["truncated"], args.cutoff_len,
            ready["template"].name, dtype, describe_batch(args),
        )
        accel.skipped.update(not_for_stage)
        log.info("optimizations: %s", accel.summary())
        if line := allocator_log_line():  # here, once the run is under way: never ahead of an input error
            log.info(line)
        line, too_many = cutoff_summary(stats, args.cutoff_len, args.truncation)
        log.info("%s", line)
        if too_many:
            log.warning("warning: --cutoff_len %d drops more than a tenth of the records: raise it%s",
                        args.cutoff_len, ", or pass --truncation keep to train over-long answers cut"
                        if args.truncation == "drop" else "")
    ready["shape_multiple"] = accel.shape_multiple
    # Before the first step: the predicted peak memory, refused beyond what the machine has unless --force
    found, batches = check_memory(args, ready, model, accel, options.total_steps)
    if probe is not None and not probe.attach(ready, found, batches, accel.padding_free, accel.shape_multiple):
        return TrainResult(Path(args.output_dir), model, {})  # --plan_steps 0: the estimate only
    pad_id = ready["tokenizer"].pad_token_id
    collator = (PackingCollator(pad_id, accel.shape_multiple) if accel.padding_free
                else PaddingCollator(pad_id, accel.shape_multiple))
    card = RunCard(
        model_type=spec.name, peft_type=method.name, template=template_definition(ready["template"]),
        base_model=None if args.model_name_or_path is None else ready["path"],
        trust_remote_code=args.trust_remote_code, quantization_bit=bits, compute_dtype=dtype,
        base_dtype=base_dtype, versions=library_versions(), arguments=asdict(args), command=command_line(),
        data={"skipped": stats.get("skipped", 0), "sources": [
            {k: src.get(k) for k in ("name", "path", "records", "skipped", "dropped")} for src in stats["sources"]],
            # what --cutoff_len did: examples whose front was cut, answers too long on their own
            **{k: stats.get(k) for k in ("examples", "truncated", "long_answers", "dropped", "truncation")}},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), stage=args.stage,
        holds_model=method.holds_model, parent=parent_record(args.adapter_dir),
        rope_scaling=scaling_of(args.rope_scaling), attn_implementation=args.attn_implementation,
    )
    stop = StopOnSignal()
    trainer = build_trainer(args, ready, model, collator, card, [stop.callback(), *(callbacks or [])])
    prepare_engine(trainer, model)
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
    metrics: dict[str, Any] = {}
    save_adapter(trainer, model, out)  # every rank: sharded engines gather the adapter first (full: the model)
    card.scaling = scaling_record(trainer, resuming.record() if resuming else None)  # every rank: gathers memory
    if trainer.is_world_process_zero():
        ready["tokenizer"].save_pretrained(out)
        card.save(out)
        tokens = trainer.tokens_seen * world_size()
        history = trainer.state.log_history
        metrics = {
            "train_loss": result.training_loss,
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "global_steps": trainer.state.global_step,
            "train_examples": len(ready["train"]),
            "tokens_seen": tokens,
            "tokens_trained": trainer.tokens_trained * world_size(),
            "tokens_per_second": tokens / wall if wall > 0 else math.nan,
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "wall_seconds": wall,
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
            **{key: card.scaling[key] for key in ("engine", "world_size", "nodes")},
            "peak_rss_mib_per_process": card.scaling["peak_rss_mib"],
            "compute_dtype": dtype,
            "base_dtype": base_dtype,
            "optimizations": accel.applied,
            "optimizations_skipped": accel.skipped,  # lever -> why it did not apply
            **reward_history(history),
            "allocator": allocator_in_use() or "system",
        }
        write_json_atomic(out / METRICS, metrics)
        plot_losses(history, out / LOSS_PLOT)
        log.info("saved the %s and run card to %s (%.0f tokens/s, %.0f s, peak RSS %.0f MiB)",
                 "model" if method.holds_model else "adapter", out, metrics["tokens_per_second"], wall, metrics["peak_rss_mib"])
    return TrainResult(out, model, metrics)
