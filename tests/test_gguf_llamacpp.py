"""The GGUF exports run in llama.cpp itself (through llama-cpp-python, where it is installed): a
tuned adapter of the embedded model merged to F16 answers as unift does, its base + the GGUF LoRA answers
as the merged model does, and the quantized files keep their perplexity on held-out arith records (q8_0
at most 1% above F16, q4_k_m at most 10%, q4_0 at most 20%; unift's own q8_0 is llama.cpp's quantizer's, bit for bit)."""

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
HELD_OUT = 32  # arith_test records for the perplexities
# The most a quantized file's perplexity may rise above F16's (relative). It may also fall: on the embedded
# model q8_0 measures 1.3-1.7% *below* F16 (llama.cpp's own quantizer gives the same file), so a fall is
# bounded only loosely, to catch a broken file.
# q4_0 (one scale per 32 weights, no per-tensor choices) measures +15% on this 135M model in llama.cpp,
# q4_k_m +4.5%: q4_k_m is the 4-bit file to ship (docs/after_training.md).
QUANT_BOUNDS = {"q8_0": 0.01, "q4_0": 0.20, "q4_k_m": 0.10}
QUANT_FALL = 0.05


@pytest.fixture(scope="module")
def exports(embedded_dir, tmp_path_factory):
    """The embedded model's 2-step LoRA run, merged to F16 GGUF (checked), the same merged model quantized, and
    the adapter alone as llama.cpp's LoRA GGUF with its F16 base."""
    import torch
    from transformers import AutoModelForCausalLM

    from unift.inference.gguf import export_gguf
    from unift.inference.gguf_quant import QUANTS, quantize_file
    from unift.inference.merge import merge

    run = trained_run(embedded_dir)
    work = tmp_path_factory.mktemp("gguf-llamacpp")
    merged = merge(str(run), str(work / "merged"), export="gguf", quant="f16")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    files = {"f16": merged / "model.gguf"}
    for quant in QUANT_BOUNDS:
        files[quant] = export_gguf(merged, model, path=work / f"{quant}.gguf", quant=quant)
    f32 = export_gguf(merged, model, path=work / "f32.gguf", quant="f32")
    del model
    files["q8_0 by llama.cpp"] = work / "q8_0-llama-cpp.gguf"
    quantize_file(f32, files["q8_0 by llama.cpp"], QUANTS["q8_0"])
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
    from unift.inference.generator import Generator
    from unift.inference.settings import PRESETS

    generator = Generator.load(str(exports["run"]))
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    settings = PRESETS["greedy"].__class__(max_new_tokens=NEW_TOKENS)
    answers = [c.text.strip() for c in generator.generate(conversations, settings, batch_size=1)]
    tokenizer = generator.tokenizer
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(generator.template, tokenizer))}
    return {"ids": [generator.prompt_ids(c) for c in conversations], "answers": answers, "tokenizer": tokenizer,
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
        assert -QUANT_FALL <= figures[quant] / figures["f16"] - 1 <= bound, (quant, figures)
    assert figures["q4_0"] != figures["f16"]  # the files really differ
    # the gguf package's q8_0 blocks are llama.cpp's: the same perplexity to rounding
    assert figures["q8_0"] == pytest.approx(figures["q8_0 by llama.cpp"], rel=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2", "internlm"])
def test_tiny_families_base_and_lora_in_llama_cpp(tiny_model, tmp_path, family):
    """Every family unift writes: llama.cpp's logits from base.gguf equal the HF base's, and with adapter.gguf
    the merged model's (F32 files; llama.cpp's own arithmetic differs by ~1e-2, the adapter moves them by ~5)."""
    import numpy as np
    import torch
    from after_training_helpers import run_folder
    from transformers import AutoModelForCausalLM

    from unift.inference.merge import merge

    run = run_folder(tiny_model(family), tmp_path / "run", "lora", model_type=family)
    lora = merge(str(run), str(tmp_path / "lora"), export="gguf-lora")
    merged = merge(str(run), str(tmp_path / "merged"), check=False)
    ids = list(range(300, 340))

    def hf(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].numpy()

    def cpp(*files):
        llm = llama_cpp.Llama(model_path=str(files[0]), lora_path=str(files[1]) if len(files) > 1 else None,
                              n_ctx=128, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])

    base, tuned = hf(tiny_model(family)), hf(merged)
    assert np.abs(cpp(lora / "base.gguf") - base).max() < 0.05
    assert np.abs(cpp(lora / "base.gguf", lora / "adapter.gguf") - tuned).max() < 0.05
    assert np.abs(tuned - base).max() > 1.0
