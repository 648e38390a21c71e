"""PEFT methods: one MethodSpec per --peft_type, plus unift's own plugins (bottleneck adapters)."""

from unift.peft.registry import METHODS, MethodSpec, get_method, wrap_model

__all__ = ["METHODS", "MethodSpec", "get_method", "wrap_model"]
