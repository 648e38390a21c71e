"""Prompt learning: virtual tokens instead of wrapped layers (prefix tuning, p-tuning, prompt tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unift.models.registry import ModelSpec
from unift.options import POSITIVE_INT, opt
from unift.peft import flags
from unift.peft.registry import MethodSpec, causal_lm, register_method

PROMPT_NOTE = "no: it adds virtual tokens, not weight changes, so there is nothing to fold into the base"


@dataclass
class PrefixFlags:
    num_virtual_tokens: int = flags.num_virtual_tokens()


@dataclass
class PTuningFlags(PrefixFlags):
    prompt_encoder_hidden_size: int = opt(128, "hidden size of the prompt encoder MLP", group="p-tuning",
                                          range=POSITIVE_INT)


@dataclass
class PromptFlags(PrefixFlags):
    prompt_init_text: str | None = opt(None, "initialise the soft prompt from this text (default: random)",
                                       group="prompt")


def _prefix_config(options: Any, spec: ModelSpec):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=causal_lm(), num_virtual_tokens=options.num_virtual_tokens)


def _ptuning_config(options: Any, spec: ModelSpec):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type=causal_lm(), num_virtual_tokens=options.num_virtual_tokens,
                               encoder_hidden_size=options.prompt_encoder_hidden_size)


def _prompt_config(options: Any, spec: ModelSpec):
    from peft import PromptTuningConfig, PromptTuningInit

    text = getattr(options, "prompt_init_text", None)
    if not text:
        return PromptTuningConfig(task_type=causal_lm(), num_virtual_tokens=options.num_virtual_tokens)
    from unift.models.loading import resolve_model_path

    # Starting from the embeddings of a task description trains faster than random virtual tokens.
    return PromptTuningConfig(
        task_type=causal_lm(), num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=text,
        tokenizer_name_or_path=resolve_model_path(getattr(options, "model_name_or_path", None)),
    )


register_method(MethodSpec(
    name="prefix", build=_prefix_config, flags=PrefixFlags, prompt_learning=True, order=30, trains_matrices=False,
    mergeable=False, merge_note=PROMPT_NOTE, aliases=("prefix_tuning",),
    description="trained key/value prefixes in every attention layer",
))
register_method(MethodSpec(
    name="p-tuning", build=_ptuning_config, flags=PTuningFlags, prompt_learning=True, order=31,
    mergeable=False, merge_note=PROMPT_NOTE, aliases=("ptuning", "p_tuning"),
    description="virtual tokens produced by a small prompt encoder (MLP)",
))
register_method(MethodSpec(
    name="prompt", build=_prompt_config, flags=PromptFlags, prompt_learning=True, order=32, trains_matrices=False,
    mergeable=False, merge_note=PROMPT_NOTE, aliases=("prompt_tuning",),
    description="trained soft-prompt embeddings before the input",
))
