"""Template parity: unift's --template against the checkpoint's own chat template (the report of `unift train`
and `unift data check`), `--template model` (the checkpoint's chat template trained with, tool calls in its
own form, masking on assistant tokens only), and a run folder that serves with exactly what it trained on:
the token ids `serve` and `chat` build for a conversation equal those the training pipeline produced."""

from __future__ import annotations

import builtins
import io
import json
import shutil
from pathlib import Path

import pytest

from unift.data.template_parity import TOOL_PROBE, check_parity, parity_at_start
from unift.data.templates import resolve_template, template_definition, template_from_definition
from unift.data.tokenize import IGNORE_INDEX, encode_conversation, encode_prompt
from unift.errors import UniftError

# A chat template of our own that renders tools (a description list and <call> blocks), unlike the embedded
# model's: the tool-call probe and native tool calls need one.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "# tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer with the number only."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 plus 5?"},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from unift.models import load_tokenizer

    return load_tokenizer(str(embedded_dir))


@pytest.fixture
def tools_tokenizer(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = TOOLS_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = original


def trained_spans(encoded, tokenizer) -> list[str]:
    spans, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


# ---- the report --------------------------------------------------------------------------------------

def test_a_named_template_is_reported_at_the_first_differing_token(tokenizer):
    report = check_parity(resolve_template("chatml", "auto", tokenizer), tokenizer)
    by_name = {r.name: r for r in report.results}
    assert by_name["system prompt and three turns"].identical  # chatml is the embedded model's format...
    differs = by_name["no system prompt"]  # ...but its chat template adds a system prompt when none is given
    assert differs.first_difference == 1
    assert differs.unift.startswith("<|im_start|>⟪user\\n") and differs.model.startswith("<|im_start|>⟪system\\n")
    assert not report.identical and len(report.results) == 3  # no tool probe: this template renders no tools
    line = report.summary()
    assert "\n" not in line and "'no system prompt' at token 1" in line and "--template model" in line


def test_identical_renderings_are_reported_as_such(tokenizer):
    for name in ("model", "auto"):
        report = check_parity(resolve_template(name, "auto", tokenizer), tokenizer)
        assert report.identical, report.lines()
        assert "token for token" in report.summary()
        assert all(line.endswith("tokens)") and "identical" in line for line in report.lines())


def test_the_tool_call_probe_where_the_template_renders_tools(tools_tokenizer):
    tok = tools_tokenizer
    auto = check_parity(resolve_template("auto", "auto", tok), tok)
    tool = {r.name: r for r in auto.results}["tool call"]
    # `auto` writes tool descriptions into the system text; the template itself lists them its own way
    assert tool.first_difference is not None and "# tools" in tool.model and "You can call" in tool.unift
    assert sum(not r.identical for r in auto.results) == 1
    assert check_parity(resolve_template("model", "auto", tok), tok).identical


def test_template_check_modes(tokenizer):
    chatml = resolve_template("chatml", "auto", tokenizer)
    assert parity_at_start(chatml, tokenizer, "off") is None
    assert parity_at_start(chatml, tokenizer, "report").startswith("template parity: --template chatml differs")
    with pytest.raises(UniftError, match="^--template_check strict: template parity"):
        parity_at_start(chatml, tokenizer, "strict")
    model = resolve_template("model", "auto", tokenizer)
    assert "token for token" in parity_at_start(model, tokenizer, "strict")


def test_no_chat_template_nothing_to_compare_and_model_refused(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        alpaca = resolve_template("alpaca", "auto", tokenizer)
        assert check_parity(alpaca, tokenizer) is None and parity_at_start(alpaca, tokenizer, "strict") is None
        with pytest.raises(UniftError, match="--template model: this checkpoint ships no chat template"):
            resolve_template("model", "auto", tokenizer)
    finally:
        tokenizer.chat_template = original


# ---- --template model ---------------------------------------------------------------------------------

def test_model_trains_only_the_assistant_turns_with_tool_calls_in_the_template_form(tools_tokenizer):
    tok = tools_tokenizer
    model = resolve_template("model", "auto", tok)
    encoded = encode_conversation(TOOL_PROBE[1], model, tok, cutoff_len=10**6)
    assert trained_spans(encoded, tok) == ['<call>add {"a": 17, "b": 25}</call><|im_end|>\n',
                                           "17 plus 25 is 42.<|im_end|>\n"]
    text = tok.decode(encoded.input_ids)
    assert "# tools\n" in text and "<|im_start|>tool\n{\"result\": 42}" in text
    # what training saw is what the chat template gives a server, token for token
    native = tok.apply_chat_template(
        [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "What is 17 plus 25?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}}]},
         {"role": "tool", "content": '{"result": 42}'}, {"role": "assistant", "content": "17 plus 25 is 42."}],
        tools=[{"type": "function", "function": t} for t in json.loads(TOOL_PROBE[1][0]["tools"])], tokenize=False)
    assert encoded.input_ids == tok(native, add_special_tokens=False)["input_ids"]


# Like templates that show only the last answer's (empty) reasoning: earlier turns render otherwise once
# later ones follow, so renderings are not prefixes of each other; each answer is located in the whole.
LAST_TURN_THINKS = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_model_locates_answers_where_the_template_rewrites_earlier_turns(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = LAST_TURN_THINKS
    try:
        model = resolve_template("model", "auto", tokenizer)
        encoded = encode_conversation(CONVERSATION, model, tokenizer, cutoff_len=10**6)
        assert trained_spans(encoded, tokenizer) == ["4<|im_end|>\n", "8<|im_end|>\n"]
        whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        assert tokenizer.decode(encoded.input_ids) == whole and whole.count("<think>") == 1
        prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
        assert encode_prompt(CONVERSATION[:-1], model, tokenizer) == tokenizer(
            prompt, add_special_tokens=False)["input_ids"]
        assert check_parity(model, tokenizer).identical
    finally:
        tokenizer.chat_template = original


def test_model_is_recorded_as_its_text_and_read_back(tools_tokenizer):
    model = resolve_template("model", "auto", tools_tokenizer)
    definition = template_definition(model)
    assert definition["name"] == "model" and definition["jinja"] == TOOLS_TEMPLATE and definition["native"]
    assert template_from_definition(json.loads(json.dumps(definition))) == model


def test_a_merged_folder_carries_the_model_template_text(tools_tokenizer, tokenizer):
    from unift.inference.chat_template import install_chat_template

    model = resolve_template("model", "auto", tools_tokenizer)
    tools_tokenizer.chat_template = "{{ 'not the trained template' }}"  # e.g. the base changed since
    assert install_chat_template(tools_tokenizer, model) and tools_tokenizer.chat_template == TOOLS_TEMPLATE


# ---- unift data check ---------------------------------------------------------------------------------

def test_data_check_prints_the_report_and_strict_stops(tiny_model, write_jsonl, capsys):
    from unift.cli import main

    data = write_jsonl([{"messages": CONVERSATION}] * 4)
    common = ["data", "check", "--model_name_or_path", str(tiny_model("llama")), "--data", str(data), "--no_example"]
    assert main([*common, "--template", "chatml"]) == 0
    out = capsys.readouterr().out
    assert "template parity: --template chatml against the checkpoint's chat template" in out
    assert "no system prompt: differs at token 1" in out and "checkpoint: <|im_start|>⟪system\\n" in out
    assert main([*common, "--template", "model"]) == 0
    assert "=> identical" in capsys.readouterr().out
    assert main([*common, "--template", "chatml", "--template_check", "strict"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unift: error: --template_check strict: template parity")


# ---- a run folder serves as it trained ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_base(tiny_model, tmp_path_factory):
    """The tiny llama with a chat template of its own (set on its tokenizer here)."""
    from unift.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tools-base")
    source = tiny_model("llama")
    for item in source.iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    tokenizer = load_tokenizer(str(source))
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _train(base: Path, template: str, work: Path) -> Path:
    from unift.cli import main

    data = work / "one.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    out = work / "run"
    code = main(["train", "--model_name_or_path", str(base), "--data", str(data), "--template", template,
                 "--max_steps", "1", "--per_gpu_train_batch_size", "1", "--val_set_size", "0",
                 "--compute_dtype", "fp32", "--output_dir", str(out), "--report_to", "none",
                 "--cutoff_len", "128"])
    assert code == 0
    return out


def _pipeline_row(run: Path, data: Path | None = None) -> dict:
    """The row the training data pipeline (unift.train.run.prepare) makes of the run's one conversation."""
    from unift.models.runcard import RunCard
    from unift.train.args import TrainArgs
    from unift.train.run import prepare

    arguments = dict(RunCard.load(run).arguments)
    if data is not None:
        arguments["data"] = [str(data)]
    rows = list(prepare(TrainArgs(**arguments)).train)
    assert len(rows) == 1
    return rows[0]


def _prompt_of_last_answer(row: dict) -> list[int]:
    labels = list(row["labels"])
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(row["input_ids"][:start])


def _recording(generator) -> list[list[int]]:
    """Every prompt's ids as the generator builds them (the real method runs; its result is kept)."""
    seen: list[list[int]] = []
    build = generator.prompt_ids

    def prompt_ids(prompt, max_prompt_tokens=None):
        ids = build(prompt, max_prompt_tokens)
        seen.append(list(ids))
        return ids

    generator.prompt_ids = prompt_ids
    return seen


@pytest.mark.parametrize("template", ["chatml", "model"])
def test_serve_and_chat_prompt_with_the_tokens_training_produced(template, tiny_model, tools_base, tmp_path,
                                                                 monkeypatch, caplog):
    from fastapi.testclient import TestClient

    from unift.inference.chat import chat_loop
    from unift.inference.generator import Generator
    from unift.inference.settings import GenerationSettings
    from unift.models.runcard import RunCard
    from unift.serve.api import create_api

    base = tools_base if template == "model" else tiny_model("llama")
    with caplog.at_level("INFO", logger="unift"):
        run = _train(base, template, tmp_path)
    said_at_start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("template parity")]
    assert len(said_at_start) == 1 and ("token for token" in said_at_start[0]) == (template == "model")
    card = RunCard.load(run)
    if template == "model":  # the text itself, so the run needs neither its base's nor its own tokenizer's
        assert card.template["jinja"] == TOOLS_TEMPLATE
        (run / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((run / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        (run / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    else:
        assert card.template == "chatml"
    trained = _pipeline_row(run)
    want = _prompt_of_last_answer(trained)

    generator = Generator.load(str(run))
    if template == "model":
        assert not generator.tokenizer.chat_template  # what serves is the card's template, not the tokenizer's
    seen = _recording(generator)
    client = TestClient(create_api(generator, GenerationSettings(max_new_tokens=2)))
    reply = client.post("/v1/chat/completions", json={"model": generator.name, "messages": CONVERSATION[:-1],
                                                      "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert seen[-1] == want and reply.json()["usage"]["prompt_tokens"] == len(want)

    # chat: two turns typed at the terminal; its second prompt holds the first answer as the model gave it
    lines = iter([CONVERSATION[1]["content"], CONVERSATION[3]["content"]])

    def typed(prompt: str = "") -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D: the chat ends
        return line

    monkeypatch.setattr(builtins, "input", typed)
    out = io.StringIO()
    tty = io.StringIO()
    tty.isatty = lambda: True
    chat_loop(generator, GenerationSettings(max_new_tokens=3), system=CONVERSATION[0]["content"], stdin=tty, out=out)
    answer = out.getvalue().split("Bot> ")[1][:-1].strip()  # as the chat keeps it in its history
    assert len(seen) == 3 and answer, out.getvalue()
    said = [*CONVERSATION[:2], {"role": "assistant", "content": answer}, CONVERSATION[3], CONVERSATION[4]]
    data = tmp_path / "said.jsonl"
    data.write_text(json.dumps({"messages": said}) + "\n", encoding="utf-8")
    assert seen[-1] == _prompt_of_last_answer(_pipeline_row(run, data))
    assert seen[1] == seen[-1][:len(seen[1])]  # the first turn's prompt starts the second's
