"""Facts about the machine the run is on: devices, dtypes, ranks, memory; atomic file writes."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from unift.errors import UniftError


@cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~4x faster than fp32 on such CPUs (docs/performance.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str, device: str | None = None) -> str:
    """'auto' -> bf16 where the hardware runs it fast, else fp16 on GPU / fp32 on CPU."""
    on_gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if name != "auto":
        if name == "fp16" and not on_gpu:
            raise UniftError("--compute_dtype fp16 needs a GPU; on CPU use bf16 or fp32")
        return name
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the names --compute_dtype uses); other dtypes by torch's name."""
    return next((name for name, d in DTYPE_NAMES.items() if d == dtype), str(dtype).removeprefix("torch."))


def cache_dir() -> Path:
    """unift's cache (the converted embedded model, tokenized data): $UNIFT_CACHE or ~/.cache/unift."""
    return Path(os.environ.get("UNIFT_CACHE", Path.home() / ".cache" / "unift"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("unift", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
