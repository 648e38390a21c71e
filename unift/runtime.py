"""Facts about the machine the run is on: ranks, memory, the cache folder; atomic file writes (dtypes:
unift.models.dtypes; devices: unift.models.devices)."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
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


# Words that appear on any command line or --config file that trains over a quantized base (the names
# of methods that quantize, and the quantization flags); tests/test_accel.py checks them against the
# method registry.
QUANTIZING_WORDS = ("qlora", "quantization_bit", "load_in_8bit", "load_in_4bit")


def _keep_out(module: str, argv: list[str], *, imported_by: str, wanted_if: tuple[str, ...]) -> bool:
    """Mark `module` absent for this process unless a word of `wanted_if` appears on the command line or in
    its --config file. A None entry in sys.modules is Python's own way to say a module is absent: `import`
    raises ImportError and `importlib.util.find_spec` returns None, which is how PEFT, transformers and
    accelerate decide that it is not installed. Decided before `imported_by` loads (it imports the module
    at start-up); returns whether it did."""
    if module in sys.modules or imported_by in sys.modules:
        return False  # decided already, or too late to matter
    text = " ".join(argv)
    if "--config" in argv[:-1]:
        try:
            text += Path(argv[argv.index("--config") + 1]).read_text(encoding="utf-8")
        except OSError:
            return False  # the parser reports the missing file; no guessing here
    if any(word in text for word in wanted_if):
        return False
    sys.modules[module] = None  # type: ignore[assignment]
    return True


def keep_bitsandbytes_out(argv: list[str]) -> bool:
    """For `unift train` runs that cannot need bitsandbytes, keep it out of the process: PEFT imports it
    whenever it is installed, and that import alone costs ~125 MB of memory and about a second (it pulls
    in torch's compiler stack)."""
    return _keep_out("bitsandbytes", argv, imported_by="peft", wanted_if=QUANTIZING_WORDS)


def keep_deepspeed_out(argv: list[str]) -> bool:
    """For `unift train` runs that do not use DeepSpeed, keep it out of the process: transformers imports
    an installed deepspeed at start-up whether or not the run uses it (a log line about the accelerator;
    peak RSS on the standard workload measured ~1,540 MiB with it, ~1,400 without). `accelerate launch`
    with a DeepSpeed config says so in the environment."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return False
    return _keep_out("deepspeed", argv, imported_by="transformers", wanted_if=("deepspeed",))
