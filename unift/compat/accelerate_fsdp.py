"""accelerate's FSDP on a machine without an accelerator.

Written against accelerate 1.16.0: `AcceleratorState` turns ACCELERATE_USE_FSDP (what `accelerate launch
--config_file configs/accelerate/fsdp.yaml` sets) into `DistributedType.FSDP` only inside its branch for
GPU-like devices (MULTI_GPU, MULTI_XPU, ...). On a CPU the state stays MULTI_CPU and `prepare_model` wraps
the model in DDP: the config is silently ignored. Its FSDP2 path itself (`fully_shard` over gloo) works on
a CPU; `use_fsdp_state` sets the state a GPU run gets, after the Trainer built its Accelerator and before
it prepares the model. Called by unift.train.engines for FSDP runs of several processes on a CPU.
"""

from __future__ import annotations

from typing import Any


def use_fsdp_state(trainer: Any) -> bool:
    """Give the Trainer's accelerator the FSDP state (a plugin from the FSDP_* environment, as on a GPU);
    returns whether anything changed."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True  # the Trainer read it from the state when it built the Accelerator
    return True
