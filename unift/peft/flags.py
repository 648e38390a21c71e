"""Flag fields that several PEFT methods read. A method's flags are a dataclass of its own (in its file
under unift/peft/methods/); fields shared between methods are made here, so `--lora_r` has one definition
whichever methods read it. `unift train` offers the union of every method's flags and refuses, for the chosen
method, any flag set that belongs only to others."""

from __future__ import annotations

from typing import Any

from unift.options import POSITIVE, POSITIVE_INT, PROBABILITY, opt


def lora_r() -> Any:
    return opt(8, "LoRA rank", group="lora", range=POSITIVE_INT)


def lora_alpha() -> Any:
    return opt(16, "LoRA scaling alpha", group="lora", range=POSITIVE)


def lora_dropout() -> Any:
    return opt(0.05, "LoRA dropout", group="lora", range=PROBABILITY)


def target_modules() -> Any:
    return opt(None, "modules to adapt, for every method that wraps layers (default: the family's and "
               "method's; LoRA-like methods: every linear layer of a block)", group="method", nargs="+",
               aliases=("--target_modules",))


def num_virtual_tokens() -> Any:
    return opt(20, "virtual tokens", group="prefix, p-tuning, prompt", range=POSITIVE_INT)
