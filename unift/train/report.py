"""What a run says and leaves: its start lines, the run card, and at the end metrics.json, the loss plot
and the closing line."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from unift.allocator import in_use as allocator_in_use
from unift.allocator import log_line as allocator_log_line
from unift.data import cutoff_summary, template_definition
from unift.models.overrides import scaling_of
from unift.models.runcard import METRICS, RunCard
from unift.options import command_line
from unift.runtime import library_versions, peak_rss_mib, world_size, write_json_atomic
from unift.train.parent import parent_record
from unift.train.prepared import PreparedRun
from unift.train.progress import LOSS_PLOT, plot_losses, reward_history

log = logging.getLogger("unift")


def announce(args: Any, prepared: PreparedRun, accel: Any, trainable: int, total: int,
             not_for_stage: dict[str, str]) -> None:
    """The main process's start lines: model, method, data and batch; the levers; the allocator; cutoff."""
    stats = prepared.stats
    log.info(
        "%s%s (%s) + %s: %s trainable of %s parameters (%.3f%%); %d train / %d val examples "
        "(%d truncated to %d tokens); template %s; compute %s; %s",
        "" if args.stage == "sft" else f"--stage {args.stage}: ", prepared.path, prepared.spec.name,
        prepared.method.name, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
        len(prepared.train), len(prepared.val), stats["truncated"], args.cutoff_len,
        prepared.template.name, prepared.plan.compute, prepared.scaling.describe_batch(args),
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


def run_card(args: Any, prepared: PreparedRun) -> RunCard:
    """The run card every checkpoint and the run folder carry: how to rebuild and serve the run."""
    stats, plan = prepared.stats, prepared.plan
    return RunCard(
        model_type=prepared.spec.name, peft_type=prepared.method.name, template=template_definition(prepared.template),
        base_model=None if args.model_name_or_path is None else prepared.path,
        trust_remote_code=args.trust_remote_code, quantization_bit=args.quantization_bit, compute_dtype=plan.compute,
        base_dtype=plan.storage, versions=library_versions(), arguments=asdict(args), command=command_line(),
        data={"skipped": stats.get("skipped", 0), "sources": [
            {k: src.get(k) for k in ("name", "path", "records", "skipped", "dropped")} for src in stats["sources"]],
            # what --cutoff_len did: examples whose front was cut, answers too long on their own
            **{k: stats.get(k) for k in ("examples", "truncated", "long_answers", "dropped", "truncation")}},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), stage=args.stage,
        holds_model=prepared.method.holds_model, parent=parent_record(args.adapter_dir),
        rope_scaling=scaling_of(args.rope_scaling), attn_implementation=args.attn_implementation,
    )


def write_metrics(out: Path, prepared: PreparedRun, trainer: Any, result: Any, card: RunCard, accel: Any,
                  wall: float, parameters: tuple[int, int]) -> dict[str, Any]:
    """metrics.json and the loss plot (the main process), and the closing line."""
    tokens = trainer.tokens_seen * world_size()
    history = trainer.state.log_history
    trainable, total = parameters
    metrics = {
        "train_loss": result.training_loss,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "global_steps": trainer.state.global_step,
        "train_examples": len(prepared.train),
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
        "compute_dtype": prepared.plan.compute,
        "base_dtype": prepared.plan.storage,
        "optimizations": accel.applied,
        "optimizations_skipped": accel.skipped,  # lever -> why it did not apply
        **reward_history(history),
        "allocator": allocator_in_use() or "system",
    }
    write_json_atomic(out / METRICS, metrics)
    plot_losses(history, out / LOSS_PLOT)
    log.info("saved the %s and run card to %s (%.0f tokens/s, %.0f s, peak RSS %.0f MiB)",
             "model" if prepared.method.holds_model else "adapter", out, metrics["tokens_per_second"], wall,
             metrics["peak_rss_mib"])
    return metrics
