"""SentencePiece tokenizers (Llama 2, InternLM, Baichuan): a tiny model trained here with the
`sentencepiece` library, loaded as a Llama-2-style tokenizer (BOS added by the tokenizer, a dummy "▁"
prefix on the text it starts on), with and without a chat template. Training and inference must give the
ids the tokenizer gives the whole rendering: no extra "▁" at the start of each piece, BOS first where the
tokenizer expects it, and the tokenizer's own chat template gives the ids of `apply_chat_template`."""

from __future__ import annotations

import io
import json
import random

import pytest

from unift.data import IGNORE_INDEX, encode_conversation, encode_prompt, get_template
from unift.data.tokenize import adds_prefix_space, bos_to_add
from unift.models import load_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog what is capital of france paris answer question instruction "
         "response user assistant system you are helpful careful calculator remember number add to it noted "
         "human below describes task write that appropriately completes request chat between curious").split()
# A chat template written after Llama 2's: BOS and [INST] around each user turn, EOS after each answer.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') "
    "+ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "Remember the number 47."},
    {"role": "assistant", "content": "Noted: 47."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital.\nAnswer: Paris"},
]
PLAIN_TEMPLATES = ["alpaca", "vicuna", "chatml", "bloom", "moss", "llama2", "internlm"]


@pytest.fixture(scope="module")
def sp_dirs(tmp_path_factory) -> dict[str, str]:
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=True, minloglevel=2)
    dirs = {}
    for name, template in (("plain", None), ("chat", LLAMA2_CHAT)):
        folder = tmp_path_factory.mktemp(f"sp-{name}")
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
        if template:
            config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = str(folder)
    return dirs


def sp_tokenizer(sp_dirs: dict[str, str], kind: str):
    """kind: plain | chat, with "-legacy" for the normalizer of Llama 2's own tokenizer.json (a "▁" before
    every text segment: " ok" alone becomes "▁▁ok")."""
    tokenizer = load_tokenizer(sp_dirs[kind.removesuffix("-legacy")])
    if kind.endswith("-legacy"):
        from tokenizers import normalizers

        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    return tokenizer


def whole(tokenizer, text: str) -> list[int]:
    """The tokenizer's ids for the whole rendering, BOS first (once) where it adds one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids]


CASES = [("plain", t) for t in PLAIN_TEMPLATES] + [(k, t) for k in ("chat", "chat-legacy") for t in ("auto", "llama2")]
CASES += [("plain-legacy", "alpaca")]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_training_and_inference_ids_are_the_tokenizers_own(sp_dirs, kind, name):
    tokenizer = sp_tokenizer(sp_dirs, kind)
    assert adds_prefix_space(tokenizer) and bos_to_add(tokenizer) == tokenizer.bos_token_id
    template = get_template(name)
    full = template.render(CONVERSATION, add_generation_prompt=False, tokenizer=tokenizer)
    enc = encode_conversation(CONVERSATION, template, tokenizer, cutoff_len=4096)
    assert enc.input_ids == whole(tokenizer, full)
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    trained = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert "Noted: 47." in trained and "Paris is the capital.\nAnswer: Paris" in trained
    # Each inference prompt is exactly the training ids up to that answer.
    for turns in (CONVERSATION[:2], CONVERSATION[:4]):
        prompt = encode_prompt(turns, template, tokenizer)
        rendered = template.render(turns, add_generation_prompt=True, tokenizer=tokenizer)
        assert prompt == whole(tokenizer, rendered)
        assert enc.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("kind", ["chat", "chat-legacy"])
def test_own_chat_template_gives_apply_chat_template_ids(sp_dirs, kind):
    tokenizer = sp_tokenizer(sp_dirs, kind)
    template = get_template("auto")

    def reference(messages, generation_prompt):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    assert encode_conversation(CONVERSATION, template, tokenizer, 4096).input_ids == reference(CONVERSATION, False)
    for turns in (CONVERSATION[:2], CONVERSATION[:4]):
        assert encode_prompt(turns, template, tokenizer) == reference(turns, True)
    assert reference(CONVERSATION[:2], True).count(tokenizer.bos_token_id) == 1


def test_bos_is_added_once_without_a_chat_template(sp_dirs):
    tokenizer = load_tokenizer(sp_dirs["plain"])
    for name in ("alpaca", "vicuna", "chatml", "bloom", "moss"):
        ids = encode_prompt(CONVERSATION[:2], get_template(name), tokenizer)
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, name


def test_a_cut_prompt_keeps_its_bos(sp_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unift.inference.generator import Generator

    tokenizer = sp_tokenizer(sp_dirs, "plain")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32))
    generator = Generator(model, tokenizer, get_template("alpaca"))
    full = generator.prompt_ids(CONVERSATION[:2])
    assert generator.prompt_ids(CONVERSATION[:2], max_prompt_tokens=8) == [tokenizer.bos_token_id, *full[-7:]]
