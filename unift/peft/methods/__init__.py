"""The --peft_type entries, one module per method (or per family of close variants). Every module here is
imported when the registry is first used, so adding a method is one file here and one test: its MethodSpec
(with its flags dataclass) is registered by the module itself."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every method module (each registers its entries)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
