"""Scaling out through the standard engines: which one a run uses (DDP from torchrun or accelerate,
FSDP from an accelerate config, DeepSpeed from --deepspeed), the effective global batch, and the
combinations refused before anything loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from unift.errors import UniftError
from unift.runtime import world_size
from unift.train.optim import check_optim_engine


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows CUDA, XPU, MPS... alike
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def deepspeed_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UniftError(f"--deepspeed {path}: no such file")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UniftError(f"--deepspeed {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UniftError(f"--deepspeed {path}: expected a JSON object")
    return config


def zero_stage(args: Any) -> int:
    if args.deepspeed:
        return int(deepspeed_config(args.deepspeed).get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)


def engine(args: Any) -> str:
    """'deepspeed', 'fsdp', 'ddp' or 'single': what the Trainer will run (accelerate launch passes its
    config to the processes as ACCELERATE_* environment variables)."""
    if getattr(args, "deepspeed", None) or _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def check_engine(args: Any) -> str:
    """Refuse what would not run as asked; returns the engine."""
    name = engine(args)
    if args.deepspeed:
        deepspeed_config(args.deepspeed)  # a missing or broken file fails in one line, before loading
    if name == "fsdp" and args.method.holds_model:
        # unift's FSDP path wraps and gathers adapters (PEFT's auto-wrap policy, the adapter's tensors)
        raise UniftError(f"--peft_type {args.method.name} under FSDP is not supported; use DDP (torchrun) or "
                         "DeepSpeed (--deepspeed)")
    check_optim_engine(args, name)  # optimizers that cannot run under DeepSpeed, or across processes
    if name in ("deepspeed", "fsdp"):
        bits = args.quantization_bit  # the method's own width, or the flag's (normalised by check_args)
        sharded = name == "fsdp" or zero_stage(args) == 3
        if bits == 8 and sharded:
            raise UniftError(f"an 8-bit base cannot be sharded by {'FSDP' if name == 'fsdp' else 'ZeRO-3'}; "
                             "use 4-bit (--peft_type qlora or --quantization_bit 4), ZeRO-2 or DDP")
    return name


def sharded_quantized_storage(args: Any) -> bool:
    """FSDP and ZeRO-3 shard flat tensors of one dtype: a 4-bit base must then store its packed weights in
    the compute dtype (bitsandbytes' quant_storage) instead of uint8."""
    name = engine(args)
    return name == "fsdp" or (name == "deepspeed" and zero_stage(args) == 3)


def describe_batch(args: Any) -> str:
    """The effective global batch, once, at start: the batch flags mean per device."""
    world = world_size()
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * world
    return (f"batch {args.per_gpu_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
            f"x {world} process{'es' if world > 1 else ''} = {per_step} examples per step ({engine(args)})")
