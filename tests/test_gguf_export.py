"""GGUF export beyond llama F16/F32 (unift.inference.gguf, gguf_quant, gguf_lora, ollama), on tiny models and
without llama.cpp: qwen2 and InternLM (Llama layout with biases) files, the gguf package's quantizations read
back through transformers, the LoRA adapter file, the Modelfile, and the one-line refusals.
tests/test_gguf_llamacpp.py runs the files in llama.cpp itself."""

from __future__ import annotations

import json
import sys

import pytest
from after_training_helpers import run_folder

from unift.errors import UniftError


@pytest.fixture(scope="module")
def lora_runs(tiny_model, tmp_path_factory):
    """run folder per family: LoRA on every linear layer, weights moved off their initialisation."""
    runs = {}

    def make(family: str):
        if family not in runs:
            runs[family] = run_folder(tiny_model(family), tmp_path_factory.mktemp(f"run-{family}"), "lora",
                                      model_type=family)
        return runs[family]

    return make


@pytest.mark.parametrize("family", ["qwen2", "internlm"])
def test_merged_gguf_of_other_llama_like_families(lora_runs, tmp_path, family):
    """qwen2 (NeoX RoPE, q/k/v biases) and InternLM in the Llama layout (llama with biases) are written; the
    merge check reads qwen2's file back through transformers, InternLM's it cannot (biases) and says so."""
    import gguf

    from unift.inference.merge import merge

    out = merge(str(lora_runs(family)), str(tmp_path / "merged"), export="gguf")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    assert arch == ("qwen2" if family == "qwen2" else "llama")
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert reader.fields["tokenizer.chat_template"].contents()
    figures = json.loads((out / "unift_merged.json").read_text())["fidelity"]["gguf"]
    if family == "qwen2":
        assert figures["mean_kl"] < 1e-9 and not figures["quantized"]
    else:
        assert "biases" in figures["not_measured"]


@pytest.mark.parametrize("quant,bound", [("q8_0", 0.05), ("q4_0", 2.0)])
def test_quantized_gguf_is_read_back_and_its_gap_reported_not_refused(lora_runs, tmp_path, quant, bound):
    """--quant q8_0/q4_0 (the gguf package's own quantizers): matrices at that type, norms F32; the merge
    check reads the file through transformers (which dequantizes) and reports the gap even above --max_kl."""
    import gguf

    from unift.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--adapter_dir", str(lora_runs("llama")), "--merged_dir", str(out), "--export", "gguf",
                 "--quant", quant, "--max_kl", "1e-9"]) == 0
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    card = json.loads((out / "unift_merged.json").read_text())
    figures = card["fidelity"]["gguf"]
    assert card["gguf_quant"] == quant and figures["quantized"] and figures["quant"] == quant
    assert 1e-9 < figures["mean_kl"] < bound  # above --max_kl, yet written: a real, bounded quantization error


def test_gguf_lora_file_layout_and_modelfile(lora_runs, tmp_path):
    """--export gguf-lora: llama.cpp's adapter layout (general.type adapter, adapter.lora.alpha, base tensor
    names + .lora_a/.lora_b with A rank x in and B out x rank), the base as GGUF, and a Modelfile that names
    both with the run's template and stop strings."""
    import gguf

    from unift.inference.merge import merge
    from unift.train.args import TrainArgs

    out = merge(str(lora_runs("llama")), str(tmp_path / "out"), export="gguf-lora")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "base.gguf", "unift_merged.json"]
    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(TrainArgs.lora_alpha)  # plain LoRA
    tensors = {t.name: t for t in reader.tensors}
    lora_a, lora_b = tensors["blk.1.attn_q.weight.lora_a"], tensors["blk.1.attn_q.weight.lora_b"]
    rank = lora_a.data.shape[0]
    assert lora_b.data.shape[-1] == rank and lora_b.data.shape[0] == 64 and lora_a.data.shape[1] == 64
    assert "blk.0.ffn_down.weight.lora_b" in tensors and not any("token_embd" in n for n in tensors)
    card = json.loads((out / "unift_merged.json").read_text())
    assert card["adapter_readback_max_rel_diff"] < 1e-6 and card["modules"] == 14
    base = gguf.GGUFReader(str(out / "base.gguf"))
    assert base.fields["general.type"].contents() == "model"
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    # the tiny models' family template here is the tokenizer's chatml-like one: found and written for Ollama
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile  # the chat template's default


def test_gguf_lora_refuses_what_llama_cpp_cannot_hold(lora_runs, tiny_model, tmp_path, capsys):
    from unift.cli import main

    dora = run_folder(tiny_model("llama"), tmp_path / "dora", "dora")
    code = main(["merge", "--adapter_dir", str(dora), "--merged_dir", str(tmp_path / "out"), "--export", "gguf-lora"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
    assert code != 0 and len(err) == 1 and "DoRA" in err[0]
    assert not (tmp_path / "out").exists()
    code = main(["merge", "--adapter_dir", str(lora_runs("llama")), "--merged_dir", str(tmp_path / "out"),
                 "--quant", "q8_0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
    assert code != 0 and len(err) == 1 and "--export gguf" in err[0]


def test_k_quants_without_llama_cpp_name_the_package(lora_runs, tmp_path, capsys, monkeypatch):
    """Without llama-cpp-python a K-quant fails in one line naming it, before any work."""
    from unift.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    code = main(["merge", "--adapter_dir", str(lora_runs("llama")), "--merged_dir", str(tmp_path / "out"),
                 "--export", "gguf", "--quant", "q4_k_m"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
    assert code != 0 and len(err) == 1 and "pip install llama-cpp-python" in err[0]
    assert not (tmp_path / "out").exists()


def test_quant_choices_match_the_exporter():
    from unift.commands.merge import QUANT_CHOICES
    from unift.inference.gguf_quant import QUANTS

    assert QUANT_CHOICES == ("auto", *QUANTS)


def test_modelfile_templates_render_like_unift(embedded_dir):
    """The Go template written for a unift template, evaluated by a tiny interpreter of the constructs it
    uses, renders a conversation exactly as unift does (chatml, Llama 2's system-in-user, alpaca)."""
    from unift.data.templates import get_template
    from unift.inference.ollama import go_template
    from unift.models import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for name in ("chatml", "llama2", "alpaca"):
        template = get_template(name)
        text = go_template(template, tokenizer.eos_token, tokenizer.bos_token or "")
        want = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
        assert render_go(text, messages) == want, name
    with pytest.raises(UniftError):
        from unift.inference.ollama import _quoted

        _quoted('a """ b')


def render_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of the subset of Go templates go_template writes: literal text, `{{ .Content }}`,
    `{{ $pending }}`, `{{ $pending := "" }}`/`= ""`/`= print "a" .Content "b"`, `{{ print "x" }}`,
    `{{ range .Messages }}`, `{{ if eq .Role "r" }}`/`else if`/`end`."""
    import re

    tokens = re.split(r"(\{\{.*?\}\})", template)
    out: list[str] = []
    state = {"pending": ""}

    def value(expr: str, message: dict) -> str:
        return message["content"] if expr == ".Content" else json.loads(expr)

    def run(body: list[str], message: dict | None) -> None:
        i = 0
        while i < len(body):
            tok = body[i]
            action = tok[2:-2].strip() if tok.startswith("{{") else None
            if action is None:
                out.append(tok)
            elif action == ".Content":
                out.append(message["content"])
            elif action == "$pending":
                out.append(state["pending"])
            elif action.startswith("print "):
                out.append(json.loads(action[6:]))
            elif action.startswith("$pending"):
                rhs = action.split("=", 1)[1].strip()
                if rhs.startswith("print "):
                    parts = re.findall(r'"(?:[^"\\]|\\.)*"|\.Content', rhs[6:])
                    state["pending"] = "".join(value(p, message) for p in parts)
                else:
                    state["pending"] = json.loads(rhs)
            elif action == "range .Messages":
                end = _matching_end(body, i)
                for item in messages:
                    run(body[i + 1:end], {"role": "tool" if item["role"] == "observation" else item["role"],
                                          "content": item["content"]})
                i = end
            elif action.startswith("if "):
                end = _matching_end(body, i)
                run(_chosen_branch(body[i:end], message), message)
                i = end
            i += 1

    run(tokens, None)
    return "".join(out)


def _matching_end(body: list[str], start: int) -> int:
    depth = 0
    for j in range(start, len(body)):
        action = body[j][2:-2].strip() if body[j].startswith("{{") else ""
        if action.startswith(("if ", "range ")):
            depth += 1
        elif action == "end":
            depth -= 1
            if depth == 0:
                return j
    raise AssertionError("unbalanced template")


def _chosen_branch(block: list[str], message: dict) -> list[str]:
    """The tokens of the first if/else-if branch whose `eq .Role "x"` holds (block: from `if` to before `end`)."""
    import re

    branches, current, condition, depth = [], [], None, 0
    for tok in block:
        action = tok[2:-2].strip() if tok.startswith("{{") else ""
        if depth == 0 and (action.startswith("if ") or action.startswith("else if ")):
            if condition is not None:
                branches.append((condition, current))
            condition, current = re.search(r'"(.*)"', action).group(1), []
            continue
        if action.startswith(("if ", "range ")):
            depth += 1
        elif action == "end":
            depth -= 1
        current.append(tok)
    branches.append((condition, current))
    return next((body for role, body in branches if role == message["role"]), [])
