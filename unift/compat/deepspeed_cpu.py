"""DeepSpeed on a machine without an accelerator: no C++ op is compiled at start-up.

Written against deepspeed 0.19.8: `deepspeed.comm`'s TorchBackend calls `build_shm_op()` when the process
group starts, which on the CPU accelerator JIT-compiles the `deepspeed_shm_comm` extension (measured on
2 busy cores: about two minutes, and it needs a C++ compiler and the Python headers). That op only speeds
up `inference_all_reduce`, which training never calls; marking it incompatible in
`deepspeed.ops.__compatible_ops__` (the table build_shm_op reads) makes build_shm_op return None and the
backend use plain torch.distributed (gloo). Applied by unift.train.engines for DeepSpeed runs on a CPU.
"""

from __future__ import annotations

SHM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> bool:
    """Mark the shared-memory comm op unusable so no process compiles it; returns whether the table had it."""
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    known = SHM_OP in table
    table[SHM_OP] = False
    return known
