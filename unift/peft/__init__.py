"""PEFT methods: one MethodSpec per --peft_type, plus unift's own plugins (bottleneck adapters).

Importing this package registers every method, including the bottleneck-adapter plugin with peft itself,
so `peft.PeftModel.from_pretrained` can load a folder saved with `--peft_type adapters`.
"""

from unift.peft.methods import load_all
from unift.peft.registry import (
    METHODS,
    MethodSpec,
    check_args,
    get_method,
    load_adapter,
    merge_refusal,
    method_flag_fields,
    method_names,
    register_method,
    trainable_parameters,
    wrap_model,
)

load_all()  # every method module under unift/peft/methods/ registers its entries

__all__ = [
    "METHODS",
    "MethodSpec",
    "check_args",
    "get_method",
    "load_adapter",
    "merge_refusal",
    "method_flag_fields",
    "method_names",
    "register_method",
    "trainable_parameters",
    "wrap_model",
]
