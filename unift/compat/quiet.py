"""Warnings of other libraries that are not the user's to act on, silenced for the command line.

Written against transformers 5.25.0 and bitsandbytes 0.50.2:
- bitsandbytes/backends/cpu/ops.py logs a warning at import on every AVX512-BF16 CPU where the optional
  `kernels` package (kernels-community/quantization-bitsandbytes) cannot be loaded;
- transformers/integrations/integration_utils.py prints "[INFO] Running in WANDB offline mode" to stdout
  at import when WANDB_MODE=offline: sent to stderr instead, where unift.console holds it with the other
  libraries' lines (a failing command then prints its one error line and nothing else).
Called by unift.cli.setup_logging (not by unift.compat.apply(): a library user keeps the warnings);
tests/test_compat.py fails once bitsandbytes stops logging it or transformers stops printing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys

BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
PRINTS_AT_IMPORT = "transformers.integrations.integration_utils"


class _StdoutToStderrLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.loader.exec_module(module)


class _PrintsToStderr(importlib.abc.MetaPathFinder):
    """Imports PRINTS_AT_IMPORT with its prints sent to stderr."""

    def find_spec(self, name, path, target=None):
        if name != PRINTS_AT_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _StdoutToStderrLoader(spec.loader)
        return spec


def apply() -> None:
    logging.getLogger(BNB_CPU_OPS_LOGGER).setLevel(logging.ERROR)
    if not any(isinstance(finder, _PrintsToStderr) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PrintsToStderr())
