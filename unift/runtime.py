"""Facts about the machine the run is on: ranks, memory, the cache folder; atomic file writes (dtypes:
unift.models.dtypes; devices: unift.models.devices)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def libc():
    """The C library through ctypes (None where it cannot be loaded)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free memory back to the system now (glibc's malloc_trim; nothing elsewhere)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def rss_mib() -> float | None:
    """Resident memory of this process now (Linux' /proc; None elsewhere): after training it shows what
    the engine keeps per process, which the peak (taken while the whole model loads) cannot. Freed memory
    is handed back to the system first: glibc keeps freed blocks under 32 MiB (a weight matrix of a few
    hundred million parameter model) in its heap, where they would still count."""
    trim_heap()
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it when the block ends, and is removed if the block
    fails: the folder appears whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("unift", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
