"""Patches of other libraries (transformers, peft, bitsandbytes, accelerate/deepspeed), each in one module
named for what it patches, each applied by an explicit call; importing a unift module applies none.

- `apply()`: the patches that change a library for the whole process (today the peft x transformers
  generation-cache fix). Idempotent and cheap: a library not imported yet is patched right after its import
  finishes, so calling it does not import peft. The entry points call it (the CLI's main, train(),
  Engine.load, merge(), unift.peft's wrap_model and load_adapter).
- per model or per process, called where they are needed: `peft_adapters` (AdaLoRA after wrapping and
  loading), `bitsandbytes` (4-bit models on CPU), `keep_out` (the CLI before anything is imported),
  `peft_types` (unift's bottleneck plugin), `quiet` (the CLI's logging set-up).

This package imports no other unift module but unift.errors: everything else calls into it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from unift.compat import bitsandbytes, generation_cache, keep_out, peft_adapters, peft_types, quiet


def apply() -> None:
    """Apply every process-wide patch (idempotent; does not import the patched libraries)."""
    after_import("peft", generation_cache.apply)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks once a module has finished executing (Python has no post-import hook of its own)."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        callbacks = self.pending.pop(name)
        exec_module = loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # back to the class's own method
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)  # nothing left to wait for
            for callback in callbacks:
                callback()

        loader.exec_module = exec_then_patch  # type: ignore[method-assign]
        return spec


_HOOK = _AfterImport()


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call `callback` now if `module` is imported, else right after it is."""
    if module in sys.modules:
        if sys.modules[module] is not None:  # None: kept out of this process (keep_out), nothing to patch
            callback()
        return
    callbacks = _HOOK.pending.setdefault(module, [])
    if callback not in callbacks:
        callbacks.append(callback)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


__all__ = ["after_import", "apply", "bitsandbytes", "generation_cache", "keep_out", "peft_adapters",
           "peft_types", "quiet"]
