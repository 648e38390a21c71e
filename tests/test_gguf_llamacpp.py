"""The GGUF exports run in llama.cpp itself (through llama-cpp-python, where it is installed): a
tuned adapter of the embedded model merged to F16 answers as unift does, its base + the GGUF LoRA answers
as the merged model does, and the quantized files keep their perplexity on held-out arith records (q8_0
within 1% of F16, q4_0 and q4_k_m within 10%)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from after_training_helpers import REPO, trained_run

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                    "llama-cpp-python: it builds llama.cpp from source)")

PROMPTS = ["What is 3 plus 3?", "What is 6 plus 6?", "What is 12 plus 30?"]
NEW_TOKENS = 12
HELD_OUT = 8  # arith_test records for the perplexities
QUANT_BOUNDS = {"q8_0": 0.01, "q4_0": 0.10, "q4_k_m": 0.10}  # relative to F16


@pytest.fixture(scope="module")
def exports(embedded_dir, tmp_path_factory):
    """The embedded model's 2-step LoRA run, merged to F16 GGUF (checked), the same merged model quantized, and
    the adapter alone as llama.cpp's LoRA GGUF with its F16 base."""
    import torch
    from transformers import AutoModelForCausalLM

    from unift.engine.gguf import export_gguf
    from unift.engine.merge import merge

    run = trained_run(embedded_dir)
    work = tmp_path_factory.mktemp("gguf-llamacpp")
    merged = merge(str(run), str(work / "merged"), export="gguf", quant="f16")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    files = {"f16": merged / "model.gguf"}
    for quant in QUANT_BOUNDS:
        files[quant] = export_gguf(merged, model, path=work / f"{quant}.gguf", quant=quant)
    del model
    lora = merge(str(run), str(work / "lora"), export="gguf-lora", quant="f16")
    return {"run": run, "merged": merged, "files": files, "lora": lora}


def load(path: Path, lora: Path | None = None):
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, seed=0,
                           n_threads=2, **kwargs)


def greedy(llm, ids: list[int], stops: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of `ids` (argmax of its logits), up to NEW_TOKENS or a stop token."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


@pytest.fixture(scope="module")
def unift_answers(exports):
    """unift's greedy answers with the adapter, its prompt token ids and its stop tokens."""
    from unift.data.templates import end_of_turn
    from unift.engine.engine import Engine
    from unift.engine.settings import PRESETS

    engine = Engine.load(str(exports["run"]))
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    settings = PRESETS["greedy"].__class__(max_new_tokens=NEW_TOKENS)
    answers = [c.text.strip() for c in engine.generate(conversations, settings, batch_size=1)]
    tokenizer = engine.tokenizer
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(engine.template, tokenizer))}
    return {"ids": [engine.prompt_ids(c) for c in conversations], "answers": answers, "tokenizer": tokenizer,
            "stops": stops}


def llama_answers(llm, unift: dict) -> list[str]:
    tokenizer = unift["tokenizer"]
    return [tokenizer.decode(greedy(llm, ids, unift["stops"]), skip_special_tokens=True).strip()
            for ids in unift["ids"]]


def test_llama_cpp_tokenizes_as_the_run_does(exports, unift_answers):
    """The GGUF's vocabulary, merges, pre-tokenizer and special tokens give llama.cpp the run's token ids."""
    llm = load(exports["files"]["f16"])
    tokenizer = unift_answers["tokenizer"]
    for ids in unift_answers["ids"]:
        text = tokenizer.decode(ids)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    digits = "Tom has 1234 apples, 56 pears; Ünïcode 你好!"
    assert llm.tokenize(digits.encode(), add_bos=False, special=False) == \
        tokenizer(digits, add_special_tokens=False)["input_ids"]


def test_merged_f16_gguf_answers_as_unift(exports, unift_answers):
    assert llama_answers(load(exports["files"]["f16"]), unift_answers) == unift_answers["answers"]


def test_base_gguf_with_the_gguf_lora_answers_as_the_merged_model(exports, unift_answers):
    """llama.cpp applies the adapter file at run time (alpha / rank · B·A) to the F16 base: the answers are
    the merged model's (and so unift's)."""
    import numpy as np

    lora = exports["lora"]
    with_lora = load(lora / "base.gguf", lora / "adapter.gguf")
    assert llama_answers(with_lora, unift_answers) == unift_answers["answers"]
    base_alone = load(lora / "base.gguf")
    ids = unift_answers["ids"][0]
    for llm in (with_lora, base_alone):
        llm.reset()
        llm.eval(ids)
    # the adapter moves llama.cpp's logits: the comparison above is not vacuous
    assert np.abs(with_lora.scores[len(ids) - 1] - base_alone.scores[len(ids) - 1]).max() > 1e-2
    modelfile = (lora / "Modelfile").read_text()
    assert "FROM ./base.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile


def held_out_rows(tokenizer) -> list[list[int]]:
    """arith_test records rendered as training renders them (prompt and answer)."""
    from unift.data import encode_conversation, load_conversations
    from unift.data.templates import get_template

    conversations = load_conversations(["arith_test"], REPO / "data", limit=HELD_OUT)
    template = get_template("auto")
    return [encode_conversation(c, template, tokenizer, cutoff_len=256).input_ids for c in conversations]


def perplexity(llm, rows: list[list[int]]) -> float:
    """exp(mean negative log-likelihood of every token after the first) over the rows, in llama.cpp."""
    import numpy as np

    total, count = 0.0, 0
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return math.exp(total / count)


def test_quantized_perplexity_stays_near_f16(exports, unift_answers, capsys):
    rows = held_out_rows(unift_answers["tokenizer"])
    figures = {name: perplexity(load(path), rows) for name, path in exports["files"].items()}
    with capsys.disabled():
        print("\nllama.cpp perplexity on", HELD_OUT, "arith_test records:", json.dumps(
            {k: round(v, 4) for k, v in figures.items()}))
    for quant, bound in QUANT_BOUNDS.items():
        assert abs(figures[quant] / figures["f16"] - 1) <= bound, (quant, figures)
    assert figures["q4_0"] != figures["f16"]  # the files really differ
