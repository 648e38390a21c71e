"""Adapter folders that unift did not write (LLaMA-Factory's, the hub's, the original toolkit's users'):
plain PEFT folders, written here by stock peft alone (get_peft_model + save_pretrained, no tokenizer and no
unift_run.json), answer through generate, predict, merge and serve."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
import torch
from after_training_helpers import PYTHON, REPO, cli_result, env, free_port

PROMPT = "What is 2 plus 2?"


@pytest.fixture(scope="module")
def foreign(tiny_model, tmp_path_factory):
    """(base folder, adapter folder) with LoRA weights away from zero, so the adapter changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    folder = tmp_path_factory.mktemp("llamafactory-style") / "lora"
    peft_model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    return base, folder


def reference_logits(base, folder, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    with torch.no_grad():
        return model(input_ids=ids).logits




def test_generator_loads_it_exactly_and_says_what_it_guessed(foreign, caplog):
    from unift.inference.generator import Generator

    base, folder = foreign
    with caplog.at_level("INFO", logger="unift"):
        generator = Generator.load(str(folder))
    guesses = [r.getMessage() for r in caplog.records if "unift_run.json" in r.getMessage()]
    assert len(guesses) == 1, guesses
    assert f"base {base} (from adapter_config.json)" in guesses[0]
    assert "model_type llama (the base's config says llama)" in guesses[0]
    assert generator.has_adapter and generator.card.peft_type == "lora" and generator.template.name == "auto"
    ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": PROMPT}])])
    with torch.no_grad():
        ours = generator.model(input_ids=ids).logits
        with generator.base_only(), generator.lock, generator._adapter_state(None):
            base_logits = generator.model(input_ids=ids).logits
    expected = reference_logits(base, folder, ids)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert (base_logits - expected).abs().max() > 1e-2  # the adapter does change the model


def test_flags_override_the_guesses(foreign, caplog):
    from unift.inference.generator import Generator

    base, folder = foreign
    with caplog.at_level("INFO", logger="unift"):
        generator = Generator.load(str(folder), base_model=str(base), model_type="llama", template="alpaca")
    assert generator.template.name == "alpaca"
    assert not [r for r in caplog.records if "unift_run.json" in r.getMessage()]


def test_generate_and_predict(foreign, tmp_path, capsys):
    _, folder = foreign
    code, out, err = cli_result(["generate", "--adapter_dir", str(folder), "--prompt", PROMPT, "--max_new_tokens", "6"],
                         capsys)
    assert code == 0, err
    assert out.strip() and err.count("has no unift_run.json") == 1
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?"}) + "\n" for i in range(3)))
    code, _, err = cli_result(["predict", "--lora_dir", str(folder), "--data", str(prompts), "--result_dir",
                        str(tmp_path / "out"), "--max_new_tokens", "4"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) for r in rows)


def test_eval_with_and_without_it(foreign, capsys):
    _, folder = foreign
    code, out, err = cli_result(["eval", "--adapter_dir", str(folder), "--max_samples", "3", "--max_new_tokens", "4",
                          "--compare_base", "--show", "0"], capsys)
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| base") or
            line.startswith("| tuned")]
    assert rows == ["base 0-shot", "tuned"] and out.count("/3)") == 2, out


def test_merge_matches_the_adapter(foreign, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, folder = foreign
    merged = tmp_path / "merged"
    code, _, err = cli_result(["merge", "--lora_dir", str(folder), "--merged_dir", str(merged)], capsys)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference_logits(base, folder, ids), rtol=1e-4, atol=1e-4)


def test_serve_answers_with_it(foreign):
    _, folder = foreign
    port = free_port()
    proc = subprocess.Popen([PYTHON, "web.py", "--lora_dir", str(folder), "--port", str(port), "--no_ui",
                             "--preset", "greedy", "--max_new_tokens", "5"], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the service did not start"
            try:
                models = httpx.get(url + "/models", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]][0] == "lora"
        answer = httpx.post(url + "/chat/completions", timeout=120, json={
            "model": "lora", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}).json()
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
