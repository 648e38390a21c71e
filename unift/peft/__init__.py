"""PEFT methods: one MethodSpec per --peft_type, plus unift's own plugins (bottleneck adapters).

Importing this package registers every method, including the bottleneck-adapter plugin with peft itself,
so `peft.PeftModel.from_pretrained` can load a folder saved with `--peft_type adapters`.
"""

from unift.peft import methods as _methods  # noqa: F401  (registers the entries)
from unift.peft.registry import (
    METHODS,
    MethodSpec,
    check_args,
    get_method,
    load_adapter,
    merge_refusal,
    method_names,
    register_method,
    wrap_model,
)

__all__ = [
    "METHODS",
    "MethodSpec",
    "check_args",
    "get_method",
    "load_adapter",
    "merge_refusal",
    "method_names",
    "register_method",
    "wrap_model",
]
