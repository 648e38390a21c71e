"""The generator folds a mergeable adapter into fp32 weights in memory (generation then costs what
the base model costs) and gives exactly the same answers and logits as with the adapter apart, the base
model too when the adapter is switched off; adapters that cannot be merged stay apart."""

from __future__ import annotations

import pytest
import torch
from after_training_helpers import run_folder

from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings

IDS = torch.tensor([[5, 17, 301, 42, 7, 9]])
QUESTIONS = [[{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Hi"}]]


def logits(generator: Generator, adapter: bool = True) -> torch.Tensor:
    with torch.no_grad(), generator.lock, generator._adapter_state(adapter):
        return generator.model(input_ids=IDS).logits.float()


@pytest.mark.parametrize(("peft_type", "merges"), [("lora", True), ("ia3", False), ("prefix", False)])
def test_merged_in_memory_equals_the_adapter_apart(tiny_model, tmp_path, peft_type, merges):
    run = run_folder(tiny_model("llama"), tmp_path / "run", peft_type)
    merged = Generator.load(str(run))
    assert merged.merged is merges
    assert not Generator.load(str(run), dtype=torch.bfloat16).merged  # half-precision bases keep it apart
    apart = Generator.load(str(run))
    if apart.merged:
        apart.model.unmerge_adapter()
        apart.merged = False
    base = Generator.load(None, base_model=str(tiny_model("llama")))
    torch.testing.assert_close(logits(merged), logits(apart), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(merged, adapter=False), logits(base), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(merged), logits(apart), atol=1e-4, rtol=1e-4)  # merged again after
    settings = GenerationSettings(max_new_tokens=6)
    assert [c.text for c in merged.generate(QUESTIONS, settings)] == [c.text for c in apart.generate(QUESTIONS, settings)]
