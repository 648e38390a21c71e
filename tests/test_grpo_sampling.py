"""The merged_sampling lever: GRPO samples a LoRA policy from a merged copy that follows every update, says
why where it cannot, and a GRPO run takes the same steps with and without it."""

from __future__ import annotations

import pytest
import torch
from conftest import memorisation_rows
from test_grpo import run_args

from unift.accel.sampling import MergedSampler, merged_sampling_refusal, use_merged_sampling
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _peft(folder, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # an update that changes the greedy answers
    return model.eval()


def _greedy(generate, ids):
    return generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                    pad_token_id=0)


def test_the_merged_copy_answers_as_the_policy_and_follows_its_updates(tiny_model):
    model = _peft(tiny_model("llama"))
    ids = torch.tensor([[5, 17, 42, 99, 7], [8, 8, 300, 12, 64]])
    with model.disable_adapter():
        plain = _greedy(model.generate, ids)
    policy = _greedy(model.generate, ids)
    assert not torch.equal(policy, plain)  # the adapter matters to the answers
    inner, calls = model.get_base_model(), []
    stock = inner.forward
    inner.forward = lambda *a, **k: calls.append(1) or stock(*a, **k)  # a patch over the policy, as TRL's
    assert use_merged_sampling(model)[0] is None and isinstance(model.generate, MergedSampler)
    assert torch.equal(_greedy(model.generate, ids), policy)
    assert not calls  # the copy answered, not the policy through a patched forward it copied
    sampler = model.generate
    with torch.no_grad():  # an optimizer step: the next generation samples the new policy
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(-1.5)
        logits = model(input_ids=ids).logits
        sampler.refresh()
    torch.testing.assert_close(sampler.copy(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
    assert sampler.copy is not model.get_base_model() and not any(p.requires_grad for p in sampler.copy.parameters())


def test_where_a_merged_copy_cannot_stand_in_it_says_why(tiny_model):
    folder = tiny_model("llama")
    assert "DoRA" in merged_sampling_refusal(_peft(folder, use_dora=True))
    assert "outside the LoRA" in merged_sampling_refusal(_peft(folder, modules_to_save=["lm_head"]))
    from transformers import AutoModelForCausalLM

    assert "not a PEFT" in merged_sampling_refusal(AutoModelForCausalLM.from_pretrained(folder))


def test_grpo_takes_the_same_steps_with_and_without_merged_sampling(tiny_model, tmp_path, write_jsonl):
    """fp32: the merged copy's logits equal the policy's to rounding, so the same seed samples the same
    completions and the run ends with the same adapter; every step sampled from the copy; the other
    stages say why the lever is not theirs."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    folder, data = tiny_model("llama"), write_jsonl(memorisation_rows(4))
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def first_id(completion_ids, **kw):\n    return [float(ids[0] % 7) if len(ids) else -1.0 "
                       "for ids in completion_ids]\n")
    sampled = {}

    class Count(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            sampled[levers] = getattr(model.__dict__.get("generate"), "calls", 0)

    ends = {}
    for levers in ("none", "all"):
        result = train(run_args(folder, data, tmp_path / levers, stage="grpo", reward_funcs=[f"{rewards}:first_id"],
                                num_generations=4, max_completion_length=6, max_steps=3, optimizations=levers),
                       callbacks=[Count()])
        ends[levers] = (result.metrics["reward_curve"], load_file(tmp_path / levers / "adapter_model.safetensors"))
        assert ("merged_sampling" in result.metrics["optimizations"]) == (levers == "all")
    assert sampled == {"none": 0, "all": 3}
    assert [p["reward"] for p in ends["none"][0]] == [p["reward"] for p in ends["all"][0]]
    for name, weight in ends["none"][1].items():
        torch.testing.assert_close(ends["all"][1][name], weight, atol=1e-4, rtol=1e-3)
    sft = train(run_args(folder, data, tmp_path / "sft", max_steps=1))
    assert sft.metrics["optimizations_skipped"]["merged_sampling"] == "only --stage grpo samples while it trains"
