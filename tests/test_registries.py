"""What the registries answer for code elsewhere: which method a foreign adapter folder holds (peft's
PeftType through the methods' names and aliases), which family a transformers model type belongs to (each
family's hf_model_types, one lookup), and which methods merge additively (the generator's in-memory merge)."""

from __future__ import annotations

import pytest

from unift.models import MODELS
from unift.models.registry import family_of_hf_type
from unift.peft import METHODS
from unift.peft.foreign import method_of_adapter


@pytest.mark.parametrize(("config", "method"), [
    ({"peft_type": "LORA"}, "lora"),
    ({"peft_type": "LORA", "use_dora": True}, "dora"),
    ({"peft_type": "ADALORA"}, "adalora"),
    ({"peft_type": "PREFIX_TUNING"}, "prefix"),
    ({"peft_type": "P_TUNING"}, "p-tuning"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt"),
    ({"peft_type": "BOTTLENECK"}, "adapters"),
    ({"peft_type": "BOFT"}, "boft"),  # no method takes it: kept as written, loading then names it
    ({}, "lora"),
])
def test_a_foreign_adapters_method_comes_from_the_method_registry(config, method):
    assert method_of_adapter(config) == method


@pytest.mark.parametrize(("hf_type", "family"), [
    ("llama", "llama"), ("mistral", "llama"), ("internlm", "internlm"), ("bloom", "bloom"), ("glm", "chatglm"),
    ("glm4", "chatglm"), ("chatglm", "chatglm"), ("codegen", "moss"), ("moss", "moss"), ("qwen2", "qwen2"),
    ("qwen", "qwen2"), ("gpt2", None), (None, None),
])
def test_a_model_type_belongs_to_one_family(hf_type, family):
    spec = family_of_hf_type(hf_type)
    assert (spec.name if spec else None) == family


def test_no_model_type_is_claimed_by_two_families():
    families = {spec.name: spec for spec in MODELS.values()}
    claimed = [t for spec in families.values() for t in spec.hf_model_types]
    assert len(claimed) == len(set(claimed))
    assert all(spec.hf_model_types for spec in families.values())  # every family can be recognised


def test_additive_merges_are_mergeable_adapters_without_a_quantized_base_of_their_own():
    methods = {m.name: m for m in METHODS.values()}
    additive = {name for name, m in methods.items() if m.additive_merge}
    assert {"lora", "adalora", "loha", "lokr", "vera"} <= additive
    assert not additive & {"dora", "ia3", "oft", "prefix", "adapters", "full", "freeze"}  # multiplicative or none
    assert all(methods[name].mergeable and not methods[name].holds_model for name in additive)
