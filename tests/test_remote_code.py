"""Checkpoints that ship their own modelling code: a tiny GLM-style model whose config.json maps (`auto_map`)
to a modelling file in its folder, with ChatGLM-6B/2/3 module names. `--model_type chatglm
--trust_remote_code` trains it with the family's default targets (which name GLM-4's modules, so the
checkpoint's own linear layers are found instead), reloads it, generates with the KV cache, and merges.
Placements that need layer roles follow the found layers, or fail naming --lora_target_modules."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from after_training_helpers import PYTHON, env

from unift.cli import main
from unift.errors import UniftError
from unift.models import get_model_spec, load_tokenizer
from unift.peft import get_method, wrap_model
from unift.peft.targets import spec_from_model
from unift.train.args import TrainArgs

MODELING = Path(__file__).with_name("remote_glm_modeling.py")
GLM_LINEAR = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
QUESTIONS = [[{"role": "user", "content": "What is the code word?"}],
             [{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Name a colour, then a number, then an animal."}]]


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, embedded_dir) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("remote-glm")
    shutil.copy(MODELING, folder / "modeling_tinyglm.py")
    tokenizer = load_tokenizer(str(embedded_dir))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tinyglm", "architectures": ["TinyGLMForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_tinyglm.TinyGLMConfig",
                     "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForCausalLM"},
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
    }))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(remote_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("remote-run")
    data = work / "d.jsonl"
    rows = [{"instruction": f"What is code word {i}?", "input": "", "output": f"It is w{i}."} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "run"
    code = main(["train", "--model_type", "chatglm", "--trust_remote_code", "--model_name_or_path", str(remote_dir),
                 "--data", str(data), "--max_steps", "3", "--learning_rate", "5e-2", "--output_dir", str(out),
                 "--per_gpu_train_batch_size", "2", "--compute_dtype", "fp32", "--report_to", "none"])
    assert code == 0
    return out


def test_the_remote_code_gate(remote_dir):
    from unift.models import load_model

    with pytest.raises(UniftError, match="trust_remote_code"):
        load_model(str(remote_dir), get_model_spec("chatglm"))


def test_trains_with_the_checkpoints_own_linear_layers(trained):
    adapter = json.loads((trained / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == GLM_LINEAR
    card = json.loads((trained / "unift_run.json").read_text())
    assert card["trust_remote_code"] is True and card["model_type"] == "chatglm"


def test_reload_generates_with_the_cache_batched_as_one_by_one(trained):
    from unift.inference.generator import Generator
    from unift.inference.settings import GenerationSettings

    generator = Generator.load(str(trained))
    assert type(generator.model.get_base_model()).__module__.startswith("transformers_modules")
    settings = GenerationSettings(max_new_tokens=8)
    batched = generator.generate(QUESTIONS, settings, batch_size=3)
    assert [c.text for c in batched] == [generator.generate([q], settings)[0].text for q in QUESTIONS]
    ids = torch.tensor([generator.prompt_ids(QUESTIONS[0])])
    with torch.no_grad():
        cached = generator.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = generator.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    with generator.base_only():
        base = generator.generate(QUESTIONS, settings, batch_size=3)
    assert [c.text for c in base] != [c.text for c in batched]  # the adapter changed the answers


def test_merges_and_the_merged_model_loads_with_plain_transformers(trained, tmp_path):
    from unift.inference.generator import Generator

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", str(trained), "--merged_dir", str(merged)]) == 0
    assert (merged / "modeling_tinyglm.py").is_file()
    generator = Generator.load(str(trained))
    ids = generator.prompt_ids(QUESTIONS[0])
    with torch.no_grad():
        expected = generator.model(input_ids=torch.tensor([ids])).logits[0, -1]
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged)!r}, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor([{ids}])).logits[0, -1].tolist()))
    """)
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def wrapped(remote_dir, peft_type: str, **options):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(remote_dir, trust_remote_code=True)
    args = TrainArgs(model_type="chatglm", peft_type=peft_type, trust_remote_code=True, **options)
    return wrap_model(model, get_method(peft_type), args, get_model_spec("chatglm"))


def test_found_layers_get_their_roles(remote_dir, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(remote_dir, trust_remote_code=True)
    with caplog.at_level(logging.INFO, logger="unift"):
        spec = spec_from_model(get_model_spec("chatglm"), model)
    assert "query_key_value dense dense_h_to_4h dense_4h_to_h" in caplog.text
    assert spec.attention_targets == ("query_key_value", "dense")
    assert spec.mlp_targets == ("dense_h_to_4h", "dense_4h_to_h") and spec.mlp_output == "dense_4h_to_h"
    assert spec_from_model(get_model_spec("bloom"), model) is get_model_spec("bloom")  # its defaults match


@pytest.mark.parametrize(("peft_type", "options", "expected"), [
    ("adapters", {"adapter_type": "houlsby"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    ("adapters", {"adapter_type": "pfeiffer"}, {"dense_4h_to_h"}),
    ("adapters", {"adapter_type": "parallel"}, {"query_key_value"}),
    ("ia3", {}, {"query_key_value", "dense_4h_to_h"}),
])
def test_placements_follow_the_found_roles(remote_dir, peft_type, options, expected):
    model = wrapped(remote_dir, peft_type, **options)
    assert set(model.peft_config["default"].target_modules) == expected


def test_placement_without_roles_names_the_flag():
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    # One linear layer in a block whose names say nothing of attention or MLP.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    layer = model.model.layers[0]
    del layer.mlp
    layer.self_attn = nn.Identity()
    layer.block = nn.ModuleDict({"w1": nn.Linear(16, 16)})
    args = TrainArgs(model_type="chatglm", peft_type="adapters", adapter_type="houlsby")
    with pytest.raises(UniftError, match="--lora_target_modules"):
        wrap_model(model, get_method("adapters"), args, get_model_spec("chatglm"))


def test_internlm_config_overrides_apply_when_loading(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unift.models import load_model

    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.fill_(0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "attention_bias": False}))  # as converted
    loaded = load_model(str(tmp_path), get_model_spec("internlm"))
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, torch.full((16,), 0.5))
    assert load_model(str(tmp_path), get_model_spec("llama")).model.layers[0].self_attn.q_proj.bias is None


def test_partly_matching_defaults_name_the_layers_left_out(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    attention = model.model.layers[0].self_attn
    attention.W_pack = attention.q_proj  # Baichuan's fused q/k/v projection in place of q/k/v_proj
    del attention.q_proj, attention.k_proj, attention.v_proj
    with caplog.at_level(logging.WARNING, logger="unift"):
        assert spec_from_model(get_model_spec("llama"), model) is get_model_spec("llama")
    assert "q_proj k_proj v_proj match no layer" in caplog.text and "W_pack" in caplog.text
