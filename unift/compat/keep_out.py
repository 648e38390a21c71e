"""bitsandbytes and deepspeed kept out of `unift train` processes that cannot use them.

Written against peft 0.22.0, accelerate 1.16.0, transformers 5.25.0, bitsandbytes 0.50.2, deepspeed 0.19.8:
- peft imports bitsandbytes, whenever it is installed, the first time it wraps a model in LoRA (its layer
  dispatchers look for bitsandbytes' layers): ~125 MB of memory and about a second, as it pulls in torch's
  compiler stack;
- transformers' `Trainer.__init__` calls accelerate's `extract_model_from_parallel`, which imports an
  installed deepspeed whether or not the run uses it (a log line about the accelerator; peak RSS on the
  standard workload measured ~1,540 MiB with it, ~1,400 without).
A None entry in sys.modules is Python's own way to say a module is absent: `import` raises ImportError and
`importlib.util.find_spec` returns None, which is how peft, transformers and accelerate decide that it is not
installed. Called by unift.cli.main before anything imports them; tests/test_compat.py fails once the
libraries stop importing them eagerly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Words that appear on any command line or --config file that trains over a quantized base (the names
# of methods that quantize, and the quantization flags); tests/test_accel.py checks them against the
# method registry.
QUANTIZING_WORDS = ("qlora", "quantization_bit", "load_in_8bit", "load_in_4bit")


def _keep_out(module: str, argv: list[str], *, imported_by: str, wanted_if: tuple[str, ...]) -> bool:
    """Mark `module` absent for this process unless a word of `wanted_if` appears on the command line or in
    its --config file. Decided before `imported_by` loads (it imports the module at start-up); returns
    whether it did."""
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
    """For `unift train` runs that cannot need bitsandbytes, keep it out of the process."""
    return _keep_out("bitsandbytes", argv, imported_by="peft", wanted_if=QUANTIZING_WORDS)


def keep_deepspeed_out(argv: list[str]) -> bool:
    """For `unift train` runs that do not use DeepSpeed, keep it out of the process. `accelerate launch`
    with a DeepSpeed config says so in the environment."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return False
    return _keep_out("deepspeed", argv, imported_by="transformers", wanted_if=("deepspeed",))


def apply(argv: list[str]) -> None:
    """Both keep-outs, for a `unift train` command line."""
    keep_bitsandbytes_out(argv)
    keep_deepspeed_out(argv)
