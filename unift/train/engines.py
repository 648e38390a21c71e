"""The engines at work: what unift sets so that DeepSpeed and FSDP train on a machine without an
accelerator with the same config files as on GPUs, and the adapter gathered whole before it is written.

Measured with torch 2.13, accelerate 1.16, transformers 5.24, deepspeed 0.19.8 on a CPU (docs/scaling.md):
- DeepSpeed: the Trainer's own DeepSpeed path runs as it stands (gloo); unift only keeps DeepSpeed from
  compiling C++ ops (the shared-memory all-reduce at start-up, cpu_adam for an offloaded optimizer).
- FSDP: accelerate keeps a CPU run MULTI_CPU and wraps the model in DDP, whatever the config says; unift sets
  accelerate's FSDP state itself, and accelerate's own FSDP2 path (fully_shard) then runs on gloo.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from unift.runtime import is_main_process, world_size
from unift.train.scaling import Scaling

log = logging.getLogger("unift")


def prepare_process(scaling: Scaling) -> None:
    """Before anything starts the engine (the Trainer does)."""
    if scaling.engine == "deepspeed" and not scaling.accelerator:
        from unift.compat import deepspeed_cpu

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed_cpu.skip_shm_comm_build()
    if scaling.engine == "fsdp" and not scaling.accelerator:
        # Both make rank 0 load the weights and broadcast them from a device; accelerate refuses them on a
        # CPU, and unift loads the same weights on every rank anyway.
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def engine_optimizations(args: Any, scaling: Scaling, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The speed levers the engine and the run's flags can take (--optimizations names what may apply)."""
    if getattr(args, "neftune_noise_alpha", None) is not None and "padding_free" in wanted:
        # The Trainer's NEFTune scales its noise by 1/sqrt(row length): a packed row of several examples
        # would get noise weaker than each example alone should.
        if is_main_process():
            log.info("with --neftune_noise_alpha, not applied: padding_free (NEFTune scales its noise by the "
                     "row's length, and a packed row holds several examples)")
        wanted = tuple(name for name in wanted if name != "padding_free")
    unsafe = scaling.unsafe_levers()
    dropped = [lever for lever in wanted if lever in unsafe]
    if dropped and is_main_process():
        log.info("under %s, not applied: %s", "FSDP" if scaling.engine == "fsdp" else "DeepSpeed",
                 "; ".join(f"{n} ({unsafe[n]})" for n in dropped))
    return tuple(lever for lever in wanted if lever not in unsafe)


def prepare_engine(trainer: Any, model: Any, scaling: Scaling) -> None:
    """After the Trainer is built, before it trains. FSDP1 gets PEFT's auto-wrap policy (its flat parameters
    cannot mix frozen and trained weights, so each layer with trainable weights becomes its own unit); FSDP2
    keeps the config's policy, one unit per decoder layer. Its checkpoints get the whole adapter beside the
    sharded state."""
    if scaling.engine == "fsdp" and not scaling.accelerator and scaling.world_size > 1:
        from unift.compat import accelerate_fsdp

        accelerate_fsdp.use_fsdp_state(trainer)
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        if plugin.fsdp_version == 1:
            from peft.utils.other import fsdp_auto_wrap_policy

            plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        # FSDP2 keeps the config's policy: accelerate 1.16 applies only a transformer-layer or size-based one
        # there and silently drops any other, such as PEFT's (the whole model was then one unit, gathered whole
        # at every step: measured, a per-process peak above DDP's). FSDP2 shards tensor by tensor, so a layer's
        # unit may hold frozen and trained weights of different dtypes.
        trainer.save_whole = lambda folder: save_adapter(trainer, model, folder, scaling)


def _gathered_adapter(model: Any) -> dict[str, Any]:
    """The adapter's tensors, whole, from FSDP's shards: a collective, every rank calls it (same order)."""
    from torch.distributed.tensor import DTensor

    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    adapter = f".{model.active_adapter}"
    whole = {}
    for key, value in sorted(model.state_dict().items()):
        if key in trained or f"{adapter}." in key or key.endswith(adapter):
            value = value.full_tensor() if isinstance(value, DTensor) else value
            whole[key] = value.detach().cpu()
    return whole


def save_adapter(trainer: Any, model: Any, folder: str | Path, scaling: Scaling) -> None:
    """Write the adapter whole into `folder`; every rank calls it. DeepSpeed: the Trainer's save_model (it
    gathers ZeRO-3's partitions); FSDP: the shards gathered, then written by the main process; DDP and one
    process hold the whole adapter already. A method that trains the model itself (full, freeze): the
    whole model, as the Trainer writes it into checkpoints (save_pretrained, safetensors)."""
    method = getattr(trainer, "method", None)
    if scaling.engine == "deepspeed" or (method is not None and method.holds_model):
        trainer.save_model(str(folder))
        return
    state_dict = _gathered_adapter(model) if scaling.engine == "fsdp" and scaling.world_size > 1 else None
    if trainer.is_world_process_zero():
        model.save_pretrained(folder, state_dict=state_dict)


def leave_process_group(finished: bool) -> None:
    """Leave torch.distributed explicitly at the end of a run. Left to the interpreter's exit, gloo's threads
    may still be running when its objects are destroyed, and the process aborts ("terminate called without
    an active exception", SIGABRT) after a run that finished: seen once in CI on a resumed 2-process run.
    After a finished run every rank waits for the others first (rank 0 is still writing the run folder); an
    interrupted one does not, since another rank may never arrive."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def node_count() -> int:
    """Nodes as the launcher counted them: torchrun (and accelerate, which runs it) says GROUP_WORLD_SIZE,
    DeepSpeed's launcher CROSS_SIZE; otherwise the world size over the processes of this node."""
    for name in ("GROUP_WORLD_SIZE", "CROSS_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", ""))
    return max(1, world_size() // int(per_node)) if per_node.isdigit() and int(per_node) > 0 else 1


def fsdp_units(model: Any) -> int:
    """The FSDP units in a prepared model: FSDP2's sharded modules (in place) or FSDP1's wrappers."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return sum(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def scaling_record(trainer: Any, resumed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine, world size, node count and every process's resident memory in MiB, by rank: its peak
    (reached while the whole model loads) and what it holds after training (the engine's sharded share). The
    engine and world size are what the Trainer's accelerator ran, not what the flags or the launcher's
    environment asked for. `resumed`: the checkpoint the run continued from and how. A collective under
    torch.distributed, so every rank calls it."""
    import torch.distributed as dist

    from unift.runtime import peak_rss_mib, rss_mib
    from unift.train.resume import live_engine

    now = rss_mib()
    mine = (round(peak_rss_mib(), 1), None if now is None else round(now, 1))
    every = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    key, world = live_engine(trainer)
    args = trainer.args
    record = {"engine": "deepspeed" if key.startswith("zero") else key, "world_size": world, "nodes": node_count(),
              "gradient_accumulation_steps": args.gradient_accumulation_steps,
              "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
              "peak_rss_mib": [peak for peak, _ in every], "rss_mib_after_training": [now for _, now in every]}
    if key.startswith("zero"):
        record["zero_stage"] = int(key[len("zero"):])
    if key == "fsdp":  # how finely it sharded: one unit per decoder layer, plus the root and its head and embeddings
        record["fsdp_units"] = fsdp_units(getattr(trainer, "model_wrapped", None) or trainer.model)
    if resumed:
        record["resumed_from"] = resumed
    return record
