"""One device choice for every command (--device auto|cpu|cuda[:N]|mps), and where a model goes on it.

`auto` is the first accelerator (CUDA, then Apple MPS), else the CPU. A model larger than the free memory of
one GPU is spread over the visible GPUs (and the CPU) with device_map="auto". Which dtype the weights
take there is unift.models.dtypes' decision.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from unift.errors import UniftError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (the first GPU, else the CPU), cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")
HEADROOM = 0.85  # share of a GPU's free memory the weights may take (activations and the KV cache need the rest)


def _parse(requested: str | None) -> tuple[str, str | None]:
    """(kind, index or None) of a --device value; anything else is one line listing the choices."""
    match = _PATTERN.match((requested or "auto").strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UniftError(f"--device {requested!r}: choose {DEVICE_HELP}")
    return match.group(1), match.group(2)


def check_device(value: str) -> str:
    """--device when the flags are parsed: a known form, normalised (`CUDA:0` -> `cuda:0`). Whether this
    machine has that device is decided when the model loads (it needs torch, which parsing does not)."""
    kind, index = _parse(value)
    return kind if index is None else f"{kind}:{index}"


def choose_device(requested: str | None, *, cuda_count: int, mps: bool) -> str:
    """The device for --device `requested` on a machine with `cuda_count` CUDA GPUs and (or not) MPS."""
    kind, index = _parse(requested)
    if kind == "auto":
        return "cuda:0" if cuda_count else "mps" if mps else "cpu"
    if kind == "cuda":
        number = int(index or 0)
        if not cuda_count:
            raise UniftError(f"--device {requested}: no CUDA GPU is visible on this machine; use --device cpu")
        if number >= cuda_count:
            raise UniftError(f"--device {requested}: only {cuda_count} CUDA GPU(s) are visible (cuda:0 to "
                             f"cuda:{cuda_count - 1})")
        return f"cuda:{number}"
    if kind == "mps" and not mps:
        raise UniftError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return kind


def resolve_device(requested: str | None) -> str:
    """choose_device on this machine."""
    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return choose_device(requested, cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                         mps=mps)


def checkpoint_bytes(path: str) -> int:
    """Size of a local checkpoint's weight files (0 for a hub id: nothing to measure before loading)."""
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))


def placement(device: str, needed_bytes: float, free_bytes: float) -> dict | str | None:
    """Where from_pretrained puts the weights: None on the CPU (its default), the whole model on `device`,
    or "auto" (spread over the visible GPUs, then the CPU) when it would not fit on that one GPU."""
    if device == "cpu":
        return None
    if device.startswith("cuda") and needed_bytes > HEADROOM * free_bytes:
        return "auto"
    return {"": device}


def device_map_for(device: str, path: str, dtype: torch.dtype) -> dict | str | None:
    """placement() for a checkpoint folder loaded in `dtype` (its files are taken as 16-bit weights)."""
    import torch

    needed = free = 0.0
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        needed = checkpoint_bytes(path) * torch.empty((), dtype=dtype).element_size() / 2
        free = torch.cuda.mem_get_info(index)[0]
    return placement(device, needed, free)


def training_device(requested: str | None) -> str:
    """The device a training run uses; a particular GPU is chosen with CUDA_VISIBLE_DEVICES (the Trainer
    and torchrun number the visible GPUs from 0)."""
    device = resolve_device(requested)
    if device.startswith("cuda:") and device != "cuda:0" and "LOCAL_RANK" not in os.environ:
        raise UniftError(f"--device {requested}: training uses the first visible GPU; run it with "
                         f"CUDA_VISIBLE_DEVICES={device.split(':')[1]} --device cuda")
    return device
