import pytest
from conftest import FAMILIES


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_model_builds_and_runs(tiny_model, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_model(model_type)
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[-1] == model.config.vocab_size
