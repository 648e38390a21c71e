"""Every template's trained answer ends with something generation stops on, in every command: the
tokenizer's EOS, the generation config's, or the template's own end-of-turn marker (<|im_end|> on a base
checkpoint whose EOS is <|endoftext|>, InternLM's <eoa>, MOSS's <eom>), and a template that ends answers
with nothing (GLM-4's own) is taught EOS."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from unift.data import IGNORE_INDEX, TEMPLATES, encode_conversation, encode_prompt
from unift.data.templates import end_of_turn
from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings
from unift.models import load_tokenizer

ANSWER = "Paris is the capital."
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": ANSWER}]
# A chat template like GLM-4's: the answer is followed by nothing until the next user turn.
GLM4_LIKE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def variants(embedded_dir, tmp_path_factory):
    """Tokenizers: the embedded one (EOS <|im_end|>), a base-checkpoint one (same ChatML chat template,
    EOS <|endoftext|>), and one with a GLM-4-like chat template."""
    folders = {"instruct": embedded_dir}
    base = load_tokenizer(str(embedded_dir))
    base.eos_token = "<|endoftext|>"
    folders["base"] = tmp_path_factory.mktemp("base-tok")
    base.save_pretrained(folders["base"])
    glm = load_tokenizer(str(embedded_dir))
    glm.chat_template = GLM4_LIKE
    folders["glm4"] = tmp_path_factory.mktemp("glm4-tok")
    glm.save_pretrained(folders["glm4"])
    return folders


def generator_for(tiny_model, tokenizer_dir, template: str) -> Generator:
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    tokenizer = load_tokenizer(str(tokenizer_dir), padding_side="left")
    # As in a real checkpoint, the generation config stops on the tokenizer's EOS (and nothing else).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return Generator(model, tokenizer, TEMPLATES[template])


def stop_point(generator: Generator, tokens: list[int]) -> tuple[int, str] | None:
    """Where generation of these tokens would stop: (tokens kept, text), or None if it would run on."""
    stops = generator.stops(GenerationSettings())
    for n, token in enumerate(tokens):
        if token in generator.eos_ids:
            return n, generator.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        text = generator.tokenizer.decode(tokens[: n + 1], skip_special_tokens=True)
        hits = [text.index(s) for s in stops if s in text]
        if hits:
            return n + 1, text[: min(hits)]
    return None


CASES = [(name, "instruct") for name in TEMPLATES] + [("auto", "base"), ("chatml", "base"), ("auto", "glm4")]


@pytest.mark.parametrize(("template", "tokenizer"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_trained_answer_ends_where_generation_stops(tiny_model, variants, template, tokenizer):
    generator = generator_for(tiny_model, variants[tokenizer], template)
    enc = encode_conversation(CONVERSATION, generator.template, generator.tokenizer, cutoff_len=512)
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    found = stop_point(generator, trained)
    assert found is not None, f"{template}: generation would not stop on {generator.tokenizer.decode(trained)!r}"
    kept, text = found
    assert text.strip() == ANSWER
    # Nothing but the end-of-turn marker and whitespace may follow the stop.
    assert generator.tokenizer.decode(trained[kept:], skip_special_tokens=True).strip() in ("", end_of_turn(
        generator.template, generator.tokenizer))


def scripted_lm_head(model, script: list[int]) -> dict:
    """Make a real model emit `script` token by token (a large logit on the next scripted token); set the
    returned state's "step" to 0 before each generation."""
    state = {"step": 0}

    def hook(_module, _inputs, output):
        token = script[min(state["step"], len(script) - 1)]
        state["step"] += 1
        output = output.clone()
        output[:, -1, token] += 1e4
        return output

    model.lm_head.register_forward_hook(hook)
    return state


@pytest.mark.parametrize(("template", "tokenizer"), [("auto", "base"), ("internlm", "instruct"),
                                                     ("moss", "instruct"), ("chatglm", "instruct")])
def test_generation_stops_on_the_template_end_marker(tiny_model, variants, template, tokenizer):
    generator = generator_for(tiny_model, variants[tokenizer], template)
    marker = end_of_turn(generator.template, generator.tokenizer) or generator.tokenizer.eos_token
    ids = generator.tokenizer
    script = ids("Yes", add_special_tokens=False)["input_ids"] + ids(marker, add_special_tokens=False)["input_ids"]
    script += ids(" and on and on", add_special_tokens=False)["input_ids"]
    state = scripted_lm_head(generator.model, script)
    settings = GenerationSettings(max_new_tokens=24)
    prompt = [{"role": "user", "content": "Is it?"}]
    done = generator.generate([prompt], settings)[0]
    assert (done.text, done.finish_reason) == ("Yes", "stop")
    state["step"] = 0
    stream = generator.open_stream(prompt, settings)
    assert "".join(stream).strip() == "Yes"
    assert stream.finish_reason == "stop" and stream.completion_tokens < 12


def test_chatglm_template_teaches_an_end_marker(embedded_dir):
    tokenizer = load_tokenizer(str(embedded_dir))
    template = TEMPLATES["chatglm"]
    enc = encode_conversation(CONVERSATION, template, tokenizer, cutoff_len=512)
    assert [t for t in enc.labels if t != IGNORE_INDEX][-1] == tokenizer.eos_token_id
    # The next turn's prompt is built from the same pieces (inference feeds what training saw).
    follow = [*CONVERSATION, {"role": "user", "content": "And of Spain?"}]
    assert encode_prompt(follow, template, tokenizer)[: len(enc.input_ids)] == enc.input_ids


def test_generator_stop_ids_include_the_template_end_token(tiny_model, variants):
    generator = generator_for(tiny_model, variants["base"], "auto")
    im_end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generator.tokenizer.eos_token == "<|endoftext|>"
    assert im_end in generator.eos_ids and generator.tokenizer.eos_token_id in generator.eos_ids
    assert torch.tensor(generator.eos_ids).unique().numel() == len(generator.eos_ids)
