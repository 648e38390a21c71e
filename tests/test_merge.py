"""Merging: the merged folder loads with plain transformers (unift not imported) and its logits equal the
adapter model's; methods that cannot be merged fail with the reason."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from after_training_helpers import PYTHON, env, run_folder, trained_run

from unift.errors import UniftError

# fp32 merge of W + ΔW: the only difference is float rounding (seen: ~1e-6 on logits of magnitude ~1).
ATOL_FP32 = 1e-4
# QLoRA merges are saved at the run's compute dtype (bf16 here). bf16 keeps ~3 significant digits, so
# the tolerance is the error bf16 itself causes: the adapter model cast to bf16, against fp32, times 2.
BF16_FLOOR_FACTOR = 2.0

MERGEABLE = {
    "lora": {},
    "dora": {},
    "adalora": {},
    "oft": {},
    "vera": {},
    "ia3": {},
    "loha": {},
    "lokr": {},
    "adapters": {"non_linearity": "linear", "bottleneck_size": 16, "adapter_type": "houlsby"},
    "adapters-parallel": {"non_linearity": "linear", "bottleneck_size": 16, "adapter_type": "parallel"},
}
REFUSED = {
    "prefix": ({}, "virtual"),
    "p-tuning": ({}, "virtual"),
    "prompt": ({}, "virtual"),
    "adapters": ({"non_linearity": "tanh", "bottleneck_size": 16}, "tanh"),
}
PROBE_IDS = [[1, 345, 2046, 88, 912, 7, 4000, 15, 9, 300]]


def method_registered(name: str) -> bool:
    from unift.peft import METHODS

    return name in METHODS


def adapter_logits(run, ids, full_precision_base: bool = False, dtype=torch.float32) -> torch.Tensor:
    """The adapter model's logits, as unift serves it (QLoRA: optionally over the fp32 base instead)."""
    from unift.inference.generator import Generator

    if full_precision_base:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from unift.models.runcard import RunCard

        base = AutoModelForCausalLM.from_pretrained(RunCard.load(run).base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(run)).eval().to(dtype)
    else:
        model = Generator.load(str(run)).model
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids)).logits.float()


PLAIN_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folders, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    result = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor(ids)).logits.float()
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                               add_generation_prompt=True)
        result[name] = {"logits": logits.tolist(), "dtype": str(model.dtype), "prompt": prompt}
    assert not any(m == "unift" or m.startswith("unift.") for m in sys.modules), "unift was imported"
    json.dump(result, open(out, "w"))
""")


@pytest.fixture(scope="module")
def merged_matrix(tiny_model, tmp_path_factory):
    """Every mergeable method: run folder -> unift merge -> plain-transformers logits (one subprocess)."""
    from unift.inference.merge import merge

    base = tiny_model("llama")
    work = tmp_path_factory.mktemp("merge")
    runs, merged = {}, {}
    for label, options in MERGEABLE.items():
        name = label.split("-")[0]
        if not method_registered(name):
            continue
        runs[label] = run_folder(base, work / f"run-{label}", name, **options)
    # QLoRA: trained over a 4-bit base; merged into the full-precision base, saved at the run's dtype.
    runs["qlora"] = run_folder(base, work / "run-qlora", "lora", quantization_bit=4, compute_dtype="bf16")
    runs["trained"] = trained_run(base)
    for label, run in runs.items():
        merged[label] = merge(str(run), str(work / f"merged-{label}"))
    out = work / "plain.json"
    subprocess.run([PYTHON, "-c", PLAIN_LOAD, json.dumps({k: str(v) for k, v in merged.items()}),
                    json.dumps(PROBE_IDS), str(out)], check=True, env=env(), cwd=work, timeout=300)
    plain = json.loads(out.read_text())
    return base, runs, merged, plain


@pytest.mark.parametrize("label", [*MERGEABLE, "qlora", "trained"])
def test_merged_logits_equal_adapter_logits(merged_matrix, label):
    base, runs, merged, plain = merged_matrix
    if label not in runs:
        pytest.skip(f"--peft_type {label} is not registered")
    # QLoRA is merged into the full-precision base, so that is what the merge must reproduce; the 4-bit
    # base the adapter trained over differs by its rounding (see docs/after_training.md).
    expected = adapter_logits(runs[label], PROBE_IDS, full_precision_base=label == "qlora")
    got = torch.tensor(plain[label]["logits"])
    atol = ATOL_FP32
    if label == "qlora":
        in_bf16 = adapter_logits(runs[label], PROBE_IDS, full_precision_base=True, dtype=torch.bfloat16)
        atol = BF16_FLOOR_FACTOR * (in_bf16 - expected).abs().max().item()
    assert (got - expected).abs().max().item() <= atol
    if label != "trained":  # the trained run moved little in 3 steps; the others must differ from the base
        from transformers import AutoModelForCausalLM

        with torch.inference_mode():
            base_logits = AutoModelForCausalLM.from_pretrained(base)(input_ids=torch.tensor(PROBE_IDS)).logits
        assert (base_logits - expected).abs().max().item() > 100 * ATOL_FP32, "the adapter changed nothing"
    assert plain[label]["dtype"] == ("torch.bfloat16" if label == "qlora" else "torch.float32")
    card = json.loads((merged[label] / "unift_merged.json").read_text())
    assert card["model_type"] == "llama" and card["probe_max_abs_logit_diff"] < atol
    # the merge check passed every method (the folder was written), and its figures say so
    from unift.inference.fidelity import DEFAULT_MAX_KL

    assert card["fidelity"]["merged"]["mean_kl"] <= DEFAULT_MAX_KL


def test_merged_folder_carries_the_run_template(tiny_model, tmp_path):
    """A run trained with --template alpaca: the merged tokenizer's chat template renders the same prompt,
    and Generator.load(merged) prompts exactly as the adapter run does."""
    from unift.data import get_template
    from unift.inference.generator import Generator
    from unift.inference.merge import merge
    from unift.models import load_tokenizer

    run = run_folder(tiny_model("llama"), tmp_path / "run", "lora", template="alpaca")
    out = merge(str(run), str(tmp_path / "merged"))
    tokenizer = load_tokenizer(str(out))
    messages = [{"role": "user", "content": "Name a colour."}]
    want = get_template("alpaca").render(messages, add_generation_prompt=True, tokenizer=tokenizer)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    generator = Generator.load(model_type=None, base_model=str(out))
    assert generator.template.name == "alpaca"
    assert generator.generate([messages], batch_size=1)[0].text == Generator.load(str(run)).generate([messages])[0].text


@pytest.mark.parametrize("name", list(REFUSED))
def test_unmergeable_methods_fail_with_the_reason(tiny_model, tmp_path, name):
    from unift.inference.merge import merge

    if not method_registered(name):
        pytest.skip(f"--peft_type {name} is not registered")
    options, reason = REFUSED[name]
    run = run_folder(tiny_model("llama"), tmp_path / "run", name, **options)
    with pytest.raises(UniftError, match=reason):
        merge(str(run), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_merge_command_with_the_original_flags(tiny_model, tmp_path, capsys):
    """`merge.py --lora_dir --merged_dir --model_type --size` on a folder made by `unift train`."""
    from unift.cli import main

    run = trained_run(tiny_model("llama"))
    out = tmp_path / "merged"
    assert main(["merge", "--lora_dir", str(run), "--merged_dir", str(out), "--model_type", "llama",
                 "--size", "7b"]) == 0
    assert (out / "config.json").exists() and (out / "unift_merged.json").exists()
    # A second run does not clobber the folder by accident.
    assert main(["merge", "--lora_dir", str(run), "--merged_dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_gguf_round_trips_through_transformers(tiny_model, tmp_path):
    """`--export gguf` writes model.gguf that transformers reads back to the same logits and tokens."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unift.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", str(trained_run(tiny_model("llama"))), "--merged_dir", str(out),
                 "--export", "gguf"]) == 0
    alone = tmp_path / "gguf"  # the file alone: transformers would otherwise mix in the folder's tokenizer files
    alone.mkdir()
    shutil.copy(out / "model.gguf", alone / "model.gguf")
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    gguf_model = AutoModelForCausalLM.from_pretrained(alone, gguf_file="model.gguf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    gguf_tok = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf")
    text = "Hello world! <|im_start|>user\nWhat's 2+2? Ünïcode 你好"
    ids = hf_tok(text)["input_ids"]
    assert gguf_tok(text)["input_ids"] == ids
    assert gguf_tok.eos_token == hf_tok.eos_token and gguf_tok.chat_template
    with torch.inference_mode():
        diff = (hf_model(input_ids=torch.tensor([ids])).logits - gguf_model(input_ids=torch.tensor([ids])).logits)
    assert diff.abs().max().item() <= ATOL_FP32
    # the merge check read the GGUF file back the same way and compared it with the adapter model
    figures = json.loads((out / "unift_merged.json").read_text())["fidelity"]
    assert figures["gguf"]["max_abs_logit_diff"] <= ATOL_FP32 and figures["gguf"]["mean_kl"] < 1e-9


def test_export_gguf_refuses_other_architectures(tiny_model, tmp_path):
    from unift.inference.merge import merge

    run = run_folder(tiny_model("bloom"), tmp_path / "run", "lora", model_type="bloom")
    with pytest.raises(UniftError, match="architecture is bloom"):
        merge(str(run), str(tmp_path / "merged"), export="gguf")
    assert not (tmp_path / "merged").exists()
