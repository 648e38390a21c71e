"""jemalloc under `unift train` where the system has it: the same speed, a fifth less peak memory.

glibc's malloc serves a training step's activations from one heap. What a step frees stays resident, and
the next tensors often do not fit the holes, so the heap's touched size climbs well past what is live:
on the standard workload (docs/performance.md) 1,156 MiB of heap were resident at the end of a forward
pass with 650 MiB in use. jemalloc keeps allocations of one size class together and reuses them, and the
same runs peak at about 1,415 MiB instead of 1,730, at the same tokens/s. It cannot be switched in a
running process (every tensor already made belongs to glibc), so `unift train` re-executes itself once,
before importing anything heavy, with the library in LD_PRELOAD; a process that already has it (or was
asked not to) carries on. Returning freed memory to the system from glibc's heap instead (the opt-in
`--release_memory`) costs speed; this does not.

UNIFT_ALLOCATOR picks: `auto` (default: jemalloc if found on Linux), `system` (never switch), or the path
of a malloc library to preload (tcmalloc, mimalloc, a jemalloc elsewhere). On Debian/Ubuntu
`apt-get install libjemalloc2` provides it; conda's `jemalloc` package too.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "UNIFT_ALLOCATOR"
MARK = "UNIFT_ALLOCATOR_ACTIVE"  # set by the re-executed process: never twice
# where distributions install it, for systems whose ldconfig cache find_library cannot read
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
# what went wrong choosing one: said in the run's log (log_line), never on stderr ahead of the command
_problems: list[str] = []


def find_jemalloc() -> str | None:
    """The system's jemalloc shared library, or None."""
    prefix = os.environ.get("CONDA_PREFIX")
    dirs = ((f"{prefix}/lib",) if prefix else ()) + _DIRS
    for folder in dirs:
        for name in _NAMES:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    found = ctypes.util.find_library("jemalloc")
    return found if found and "/" in found else None


def _choice() -> str:
    return os.environ.get(ENV, "auto").strip() or "auto"


def wanted_library() -> str | None:
    """The library UNIFT_ALLOCATOR asks for (None: keep the system's malloc)."""
    choice = _choice()
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        return find_jemalloc()
    if not Path(choice).is_file():
        _problems.append(f"warning: {ENV}={choice} is not a file; kept the system's malloc")
        return None
    return choice


def in_use() -> str | None:
    """The preloaded allocator this process runs on (its library path), or None for the system's."""
    return os.environ.get(MARK) or None


def log_line() -> str | None:
    """The run log's line about memory allocation: the preloaded library, or (on Linux, where nobody chose)
    that jemalloc would help and is not installed; what went wrong choosing one comes first."""
    if _problems:
        return "memory allocator: " + "; ".join(_problems)
    if in_use():
        return f"memory allocator: {in_use()} ({ENV}=system to keep glibc's)"
    if sys.platform.startswith("linux") and _choice() == "auto" and find_jemalloc() is None:
        return ("memory allocator: glibc's; with jemalloc installed (apt-get install libjemalloc2) training peaks "
                "about a fifth lower at the same speed")
    return None


def reexec_with_allocator() -> None:
    """Replace this process by itself with the wanted allocator preloaded; return (doing nothing) where no
    switch is wanted or possible."""
    if os.environ.get(MARK):
        return
    library = wanted_library()
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None or Path(library).name in preloaded:
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    env = {**os.environ, MARK: library, "LD_PRELOAD": f"{library}:{preloaded}".rstrip(":")}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as err:  # the interpreter cannot be run again: carry on as we are
        _problems.append(f"warning: could not restart with {library} ({err}); kept the system's malloc")
