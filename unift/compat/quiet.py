"""Warnings of other libraries that are not the user's to act on, silenced for the command line.

Written against peft 0.21.2, transformers 5.24.0 and bitsandbytes 0.50.2:
- transformers 5 renamed gradient checkpointing (`activation_checkpointing_enable`) and warns with a
  FutureWarning on the old `gradient_checkpointing_enable`, which peft's `prepare_model_for_kbit_training`
  still calls;
- bitsandbytes/backends/cpu/ops.py logs a warning at import on every AVX512-BF16 CPU where the optional
  `kernels` package (kernels-community/quantization-bitsandbytes) cannot be loaded.
Called by unift.cli.setup_logging (not by unift.compat.apply(): a library user keeps the warnings);
tests/test_compat.py fails once peft stops calling the old name or bitsandbytes stops logging it.
"""

from __future__ import annotations

import logging
import warnings

GRADIENT_CHECKPOINTING = ".*gradient_checkpointing.* is deprecated"
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def apply() -> None:
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING, category=FutureWarning)
    logging.getLogger(BNB_CPU_OPS_LOGGER).setLevel(logging.ERROR)
