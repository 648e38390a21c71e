"""--template FILE: a prompt format of one's own (YAML/JSON fields or a Jinja chat template), stored in the
run card by content so every later command prompts the same after the file is gone. Checked on the Taiwan-
LLaMA homework's prompt: `unift eval` perplexity equals the homework's own computation."""

from __future__ import annotations

import json
import math

import pytest
from test_data_cli import run

from unift.cli import main
from unift.data import IGNORE_INDEX, encode_conversation, resolve_template, template_definition
from unift.errors import UniftError
from unift.models import load_tokenizer

SYSTEM = "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
HOMEWORK_YAML = f"""\
# The Taiwan-LLaMA homework's prompt: BOS, the system text, "USER: ... ASSISTANT:", the answer, EOS
prefix: "{{bos}}"
default_system: "{SYSTEM}"
user: "USER: {{content}} ASSISTANT:"
assistant: "{{content}}{{eos}}"
"""
ROWS = [{"instruction": f"翻譯成文言文：我今天吃了{i}個蘋果。", "output": f"吾今日食蘋果{i}枚。"} for i in range(6)]


def homework_prompt(instruction: str) -> str:
    return f"{SYSTEM}USER: {instruction} ASSISTANT:"


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return load_tokenizer(str(embedded_dir))


def test_the_homework_prompt_renders_and_masks_like_the_homework(tmp_path, tokenizer):
    path = tmp_path / "taiwan.yaml"
    path.write_text(HOMEWORK_YAML, encoding="utf-8")
    template = resolve_template(str(path), "alpaca", tokenizer)
    turns = [{"role": "user", "content": ROWS[0]["instruction"]}, {"role": "assistant", "content": ROWS[0]["output"]}]
    encoded = encode_conversation(turns, template, tokenizer, cutoff_len=512)
    prompt = [tokenizer.bos_token_id] + tokenizer(homework_prompt(ROWS[0]["instruction"]),
                                                  add_special_tokens=False)["input_ids"]
    answer = tokenizer(ROWS[0]["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids == prompt + answer
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == answer
    # the run card keeps the definition, and the definition gives back the same template
    definition = template_definition(template)
    assert isinstance(definition, dict) and definition["format"]["default_system"] == SYSTEM
    assert resolve_template(json.loads(json.dumps(definition)), "alpaca", tokenizer) == template
    assert template_definition(resolve_template("chatml", "alpaca", tokenizer)) == "chatml"


@pytest.mark.parametrize("text, field", [
    ('user: "Q: {content}"\nassistent: "{content}"\n', "assistent"),
    ('user: "Q: {content}"\n', "assistant"),
    ('user: "Q: {content}"\nassistant: "{answer}"\n', "assistant"),
])
def test_a_bad_template_file_is_one_line_naming_file_and_field(tmp_path, tokenizer, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UniftError) as err:
        resolve_template(str(path), "alpaca", tokenizer)
    assert str(path) in str(err.value) and repr(field) in str(err.value) and "\n" not in str(err.value)


def test_a_jinja_template_file_is_applied_like_a_chat_template(tmp_path, tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
                    encoding="utf-8")
    template = resolve_template(str(path), "alpaca", tokenizer)
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenizer=tokenizer)
    assert text == "<user>hi<assistant>"
    assert resolve_template(template_definition(template), "alpaca", tokenizer) == template


def homework_perplexity(model, tokenizer, rows) -> float:
    """The homework's ppl.py: BOS + prompt tokens, answer tokens + EOS, exp of the mean answer-token NLL per
    example, mean over examples."""
    import torch

    values = []
    for row in rows:
        prompt = [tokenizer.bos_token_id] + tokenizer(homework_prompt(row["instruction"]),
                                                      add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        mask = torch.tensor([[0] * len(prompt) + [1] * len(answer)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
        values.append(math.exp(float((loss * mask[0, 1:]).sum() / mask[0, 1:].sum())))
    return sum(values) / len(values)


def test_train_and_eval_with_the_homework_prompt(tmp_path, tiny_model, capsys):
    tiny = tiny_model("llama")
    template_file = tmp_path / "taiwan.yaml"
    template_file.write_text(HOMEWORK_YAML, encoding="utf-8")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    code, out, err = run(["data", "check", "--data", str(data), "--model_name_or_path", str(tiny),
                          "--template", str(template_file)], capsys)
    assert code == 0, err
    assert "taiwan" in out and "USER: 翻譯成文言文" in out  # the rendering, with the trained tokens marked
    out_dir = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model_name_or_path", str(tiny), "--template", str(template_file),
                 "--output_dir", str(out_dir), "--max_steps", "3", "--per_gpu_train_batch_size", "2",
                 "--learning_rate", "1e-2", "--compute_dtype", "fp32", "--lora_r", "4", "--report_to", "none"]) == 0
    card = json.loads((out_dir / "unift_run.json").read_text(encoding="utf-8"))
    assert card["template"]["format"]["user"] == "USER: {content} ASSISTANT:"
    template_file.unlink()  # later commands prompt from the run card, not the file
    held_out = tmp_path / "test.json"
    held_out.write_text(json.dumps(ROWS[:4], ensure_ascii=False), encoding="utf-8")
    results = tmp_path / "eval.json"
    assert main(["eval", "--adapter_dir", str(out_dir), "--data", str(held_out), "--metrics", "ppl",
                 "--output", str(results), "--device", "cpu", "--dtype", "fp32"]) == 0
    document = json.loads(results.read_text(encoding="utf-8"))
    ours = document["setups"][0]["tasks"][str(held_out)]["perplexity"]

    # --template overrides the card's in eval too (it was ignored there)
    other = tmp_path / "eval-chatml.json"
    assert main(["eval", "--adapter_dir", str(out_dir), "--data", str(held_out), "--metrics", "ppl",
                 "--output", str(other), "--device", "cpu", "--dtype", "fp32", "--template", "chatml"]) == 0
    assert json.loads(other.read_text(encoding="utf-8"))["setups"][0]["tasks"][str(held_out)]["perplexity"] != ours

    from unift.loader import load

    loaded = load(str(out_dir), device="cpu", dtype="fp32")
    assert loaded.template.user == "USER: {content} ASSISTANT:"
    assert ours == pytest.approx(homework_perplexity(loaded.model.eval(), loaded.tokenizer, ROWS[:4]), rel=1e-5)

    # merge: the merged folder's chat template renders the homework prompt, and unift_merged.json keeps it
    from transformers import AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", str(out_dir), "--merged_dir", str(merged)]) == 0
    assert json.loads((merged / "unift_merged.json").read_text(encoding="utf-8"))["template"] == card["template"]
    plain = AutoTokenizer.from_pretrained(merged)
    turns = [{"role": "user", "content": ROWS[0]["instruction"]}]
    rendered = plain.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered == plain.bos_token + homework_prompt(ROWS[0]["instruction"])
    assert load(base_model=str(merged), device="cpu", dtype="fp32").template == loaded.template
