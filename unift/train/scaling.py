"""Which engine a run scales out with, decided once, before anything loads: DDP (torchrun or accelerate),
FSDP (an accelerate config), DeepSpeed (--deepspeed, or an accelerate config) or a single process; its
DeepSpeed config and ZeRO stage, the speed levers it cannot take, the combinations it refuses. The run
carries the answer as `Scaling` (PreparedRun.scaling); nothing after this module reads the flags or the
launcher's environment again to ask which engine runs. What the engines need at work (the CPU settings,
gathering the adapter to save it): unift.train.engines."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unift.errors import UniftError
from unift.runtime import world_size
from unift.train.optim import check_optim_engine

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
# Speed levers that read a weight outside its module's forward: under FSDP2 that weight is still a sharded
# DTensor there (measured: "aten.mm.default got mixed torch.Tensor and DTensor" in label_loss).
FSDP_UNSAFE_LEVERS = {"label_loss": "it reads the output layer's weight, which FSDP shards, outside that layer"}
# Sharding engines flatten, cast and partition the frozen weights themselves.
SHARDED_UNSAFE_LEVERS = {"bf16_storage": "the engine stores and casts the weights it shards itself",
                         "merged_sampling": "a copy of the policy would hold this process's shard only"}


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


@dataclass(frozen=True)
class Scaling:
    """The engine a run trains under, as decided before it starts (the run card records what the Trainer's
    accelerator then ran: unift.train.engines.scaling_record)."""

    engine: str = "single"  # one of ENGINES
    world_size: int = 1
    zero_stage: int = 0  # DeepSpeed's ZeRO stage; 0 for the other engines
    deepspeed_file: str | None = None  # --deepspeed as given
    deepspeed_config: dict[str, Any] | None = field(default=None, compare=False)  # its contents
    accelerator: bool = False  # a GPU (or another accelerator) is present

    @property
    def sharded(self) -> bool:
        """FSDP and ZeRO-3 partition the weights themselves (flat tensors of one dtype)."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)

    @property
    def key(self) -> str:
        """single, ddp, fsdp, zero1, zero2 or zero3: engines whose checkpoints differ in layout. unift shards
        a CPU run under FSDP only with several processes, so one CPU process under an FSDP config runs
        single."""
        if self.engine == "fsdp" and self.world_size == 1 and not self.accelerator:
            return "single"
        return f"zero{self.zero_stage}" if self.engine == "deepspeed" else self.engine

    def unsafe_levers(self) -> dict[str, str]:
        """The speed levers this engine cannot take, with why."""
        if self.engine == "fsdp":
            return {**SHARDED_UNSAFE_LEVERS, **FSDP_UNSAFE_LEVERS}
        return dict(SHARDED_UNSAFE_LEVERS) if self.engine == "deepspeed" else {}

    def trainer_deepspeed(self) -> str | dict[str, Any] | None:
        """What TrainingArguments(deepspeed=...) gets: the file as given on a GPU; on a CPU its contents with
        DeepSpeed's own C++ optimizer (cpu_adam, compiled at start: ~4 minutes measured) replaced by torch's
        AdamW, which DeepSpeed takes with `zero_force_ds_cpu_optimizer: false`."""
        if not self.deepspeed_file or self.accelerator:
            return self.deepspeed_file
        return {**(self.deepspeed_config or {}), "zero_force_ds_cpu_optimizer": False}

    def describe_batch(self, args: Any) -> str:
        """The effective global batch, once, at start: the batch flags mean per device."""
        per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * self.world_size
        return (f"batch {args.per_gpu_train_batch_size} per device x {args.gradient_accumulation_steps} "
                f"accumulation x {self.world_size} process{'es' if self.world_size > 1 else ''} = {per_step} "
                f"examples per step ({self.engine})")


def decide_scaling(args: Any) -> Scaling:
    """The run's engine, from --deepspeed and the launcher's environment (accelerate launch passes its config
    to the processes as ACCELERATE_* variables); what would not run as asked is refused here, in one line."""
    config = deepspeed_config(args.deepspeed) if getattr(args, "deepspeed", None) else None
    if config is not None or _env_true("ACCELERATE_USE_DEEPSPEED"):
        name = "deepspeed"
    elif _env_true("ACCELERATE_USE_FSDP"):
        name = "fsdp"
    else:
        name = "ddp" if world_size() > 1 else "single"
    if config is not None:
        stage = int(config.get("zero_optimization", {}).get("stage", 0))
    else:  # accelerate's DeepSpeed plugin (or no DeepSpeed: 0)
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0) if name == "deepspeed" else 0
    scaling = Scaling(engine=name, world_size=world_size(), zero_stage=stage, deepspeed_file=args.deepspeed or None,
                      deepspeed_config=config, accelerator=has_accelerator())
    _refuse(args, scaling)
    return scaling


def _refuse(args: Any, scaling: Scaling) -> None:
    name = scaling.engine
    if name == "fsdp" and args.method.holds_model:
        # unift's FSDP path gathers and saves adapters (their tensors whole from the shards), not whole models
        raise UniftError(f"--peft_type {args.method.name} under FSDP is not supported; use DDP (torchrun) or "
                         "DeepSpeed (--deepspeed)")
    check_optim_engine(args, name)  # optimizers that cannot run under DeepSpeed, or across processes
    if args.quantization_bit == 8 and scaling.sharded:  # the method's own width, or the flag's
        raise UniftError(f"an 8-bit base cannot be sharded by {'FSDP' if name == 'fsdp' else 'ZeRO-3'}; "
                         "use 4-bit (--peft_type qlora or --quantization_bit 4), ZeRO-2 or DDP")
