"""The one dtype policy: names <-> torch dtypes, which hardware runs bf16 fast, and, once per run, the
dtype the model computes in and the dtype its weights are stored in.

Names are spelled as --compute_dtype and --dtype spell them (fp32, bf16, fp16). What is decided here is
written into the run card (compute_dtype, base_dtype), so commands that reload a run read it back instead
of guessing it again from the loaded model.

Training: `auto` compute is bf16 where the CPU or GPU runs it natively, else fp16 on GPUs and fp32 on CPUs.
The frozen base is stored in the compute dtype when it is half precision and the `base_dtype` speed-up is
wanted; otherwise in fp32 (bf16/fp16 on a CUDA GPU). A quantized base keeps its unquantized weights in the
compute dtype (bitsandbytes computes in it).
Inference: fp32 on CPUs (bf16 runs there as autocast), bf16/fp16 on CUDA GPUs, fp16 on Apple MPS, unless
--dtype says otherwise; a quantized run's base is rebuilt as training built it, quantized from the run's
compute dtype, and its unquantized weights then go to fp32 (as PEFT's k-bit preparation left them).
Merging: in fp32 (the sum W + dW is rounded once, when saved), saved at saved_dtype().
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import torch

from unift.errors import UniftError

NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's own spellings, as config.json and older flags write them
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HALF = ("bf16", "fp16")

Purpose = Literal["train", "infer", "merge"]


class RunCard(Protocol):
    """What the policy reads of a run card (unift.models.runcard.RunCard; not imported: runcard imports the
    model registry, which imports this module)."""

    quantization_bit: int | None
    compute_dtype: str


CPU_BF16_ENV = "UNIFT_CPU_BF16"  # auto (read the CPU's flags), 1 (the bf16 plan), 0 (the fp32 plan)


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """Which of AVX512-BF16 and AMX the CPU's flags name: bf16 matmuls run ~4x faster than fp32 there."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ()
    return tuple(flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags)


def cpu_has_bf16() -> bool:
    """Whether CPU training plans bf16 (docs/performance.md): the CPU's flags, unless UNIFT_CPU_BF16 forces
    one plan on any CPU (1: bf16, emulated and slower where the CPU lacks it; 0: fp32), so that both branches
    can be run and tested on every machine."""
    forced = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if forced in ("1", "true", "yes", "on", "bf16"):
        return True
    if forced in ("0", "false", "no", "off", "fp32"):
        return False
    if forced not in ("", "auto"):
        raise UniftError(f"{CPU_BF16_ENV}={forced}: use auto, 1 (the bf16 plan) or 0 (the fp32 plan)")
    return bool(cpu_bf16_flags())


def gpu_half() -> str:
    """The half precision a CUDA GPU runs: bf16 where it has it (Ampere on), else fp16."""
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(name: str) -> torch.dtype:
    """'bf16' (or 'bfloat16') -> torch.bfloat16; other torch dtype names as torch spells them."""
    name = ALIASES.get(name, name)
    if name in NAMES:
        return NAMES[name]
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise UniftError(f"unknown dtype {name!r}; known: {', '.join(NAMES)}")
    return found


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 (or 'bfloat16') -> 'bf16'; dtypes without a short name by torch's name."""
    if isinstance(dtype, str):
        return ALIASES.get(dtype, dtype)
    return next((name for name, d in NAMES.items() if d == dtype), str(dtype).removeprefix("torch."))


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A --dtype value: None for no choice (None, '', 'auto'), else the torch dtype."""
    if name in (None, "", "auto"):
        return None
    if name not in NAMES and name not in ALIASES:
        raise UniftError(f"unknown dtype {name!r}; known: auto, {', '.join(sorted([*NAMES, *ALIASES]))}")
    return torch_dtype(name)


def _on_cuda(device: str | None) -> bool:
    return torch.cuda.is_available() if device is None else device.startswith("cuda")


def resolve_compute_dtype(name: str, device: str | None = None) -> str:
    """--compute_dtype: 'auto' -> bf16 where the hardware runs it fast, else fp16 on GPU / fp32 on CPU.
    `device` None: the first GPU if there is one."""
    on_gpu = _on_cuda(device)
    if name != "auto":
        name = dtype_name(name)
        if name == "fp16" and not on_gpu:
            raise UniftError("--compute_dtype fp16 needs a GPU; on CPU use bf16 or fp32")
        return name
    if on_gpu:
        return gpu_half()
    return "bf16" if cpu_has_bf16() else "fp32"


def weights_dtype(device: str | None = None) -> str:
    """Weights dtype for inference when nobody asked: fp32 on CPUs, bf16/fp16 on CUDA, fp16 on MPS.
    `device` None: the first GPU if there is one."""
    if _on_cuda(device):
        return gpu_half()
    return "fp16" if device == "mps" else "fp32"


@dataclass(frozen=True)
class DtypePlan:
    """What one run loads and computes in, decided once.

    compute: the dtype the forward computes in (training's autocast; a quantized base's bitsandbytes
             compute dtype; at inference the weights' own dtype).
    storage: the dtype the base weights are loaded in (the run card's base_dtype).
    """

    compute: str
    storage: str
    purpose: Purpose = "infer"
    quantization_bit: int | None = None
    quant_storage: str | None = None  # 4-bit weights packed in this dtype (sharding engines), else uint8

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch_dtype(self.compute)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch_dtype(self.storage)

    @property
    def quantized(self) -> bool:
        return bool(self.quantization_bit)

    @property
    def upcast_unquantized(self) -> bool:
        """Inference over a quantized base: its remaining half-precision weights go to fp32 after loading,
        as training's k-bit preparation had them."""
        return self.purpose == "infer" and self.quantized

    @property
    def half_base(self) -> bool:
        """The frozen base itself is half precision (and not quantized)."""
        return not self.quantized and self.storage in HALF


def training_plan(compute_dtype: str, device: str, *, quantization_bit: int | None = None,
                  half_base: bool = True, sharded: bool = False, trains_weights: bool = False) -> DtypePlan:
    """--compute_dtype on `device`. `half_base`: the base_dtype speed-up is wanted (the frozen base stored
    in a half-precision compute dtype instead of being cast on every step). `sharded`: an engine that
    shards 4-bit weights (FSDP, ZeRO-3) packs them in the compute dtype. `trains_weights`: the model's own
    weights train (full, freeze): they are stored in fp32 on every device, the optimizer's master copy
    (updates far below a bf16 weight's precision would otherwise round away), and autocast computes."""
    compute = resolve_compute_dtype(compute_dtype, device)
    if trains_weights:
        return DtypePlan(compute, "fp32", "train")
    if quantization_bit:
        # bitsandbytes keeps the unquantized weights (norms, embeddings, head) in its compute dtype
        return DtypePlan(compute, compute, "train", quantization_bit,
                         compute if quantization_bit == 4 and sharded else None)
    if half_base and compute in HALF:
        storage = compute
    else:
        storage = gpu_half() if device.startswith("cuda") else "fp32"
    return DtypePlan(compute, storage, "train")


def inference_plan(dtype: str | torch.dtype | None, device: str, card: RunCard | None = None) -> DtypePlan:
    """--dtype (None: the device's) for a model used on `device`; `card`: the run card of its adapter."""
    bits = card.quantization_bit if card else None
    if bits:
        # rebuilt as training built it: quantized from the run's compute dtype (--dtype does not apply)
        compute = dtype_name(card.compute_dtype or "fp32")
        return DtypePlan(compute, compute, "infer", bits)
    storage = weights_dtype(device) if dtype in (None, "", "auto") else dtype_name(dtype)
    return DtypePlan(storage, storage, "infer")


def merge_plan() -> DtypePlan:
    """Merging is done in fp32 whatever the saved dtype, so W + dW is not rounded twice; a quantized run's
    base is re-loaded in full precision (the 4-bit base cannot hold the sum)."""
    return DtypePlan("fp32", "fp32", "merge")


def saved_dtype(requested: str | None, card: RunCard, stored: torch.dtype | str | None) -> str:
    """The merged weights' dtype: --compute_dtype if given; for a quantized run the run's compute dtype;
    else `stored`, the base checkpoint's own dtype as its config.json says; fp32 when it says nothing."""
    if requested and requested != "auto":
        return dtype_name(requested)
    if card.quantization_bit:
        return dtype_name(card.compute_dtype or "fp32")
    if isinstance(stored, str):
        stored = parse_dtype(stored) if stored in NAMES or stored in ALIASES else None
    return dtype_name(stored) if isinstance(stored, torch.dtype) else "fp32"
