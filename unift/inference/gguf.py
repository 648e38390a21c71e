"""GGUF export of a merged model (llama, InternLM in the Llama layout, qwen2; byte-level BPE tokenizers): one
file that llama.cpp, Ollama and transformers' `from_pretrained(..., gguf_file=)` read, in F32/F16/BF16 or
quantized (unift.inference.gguf_quant). The tokenizer, its special tokens and the chat template go into the
file's metadata."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from unift.errors import UniftError
from unift.inference.gguf_quant import Quant, quantize_file, resolve_quant, tensor_array

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
# Hugging Face model type -> (GGUF architecture, whether q/k rows are re-ordered for GGML's rotary layout).
# llama.cpp runs llama's RoPE on interleaved pairs (HF keeps the two halves apart), qwen2's as HF does (NeoX).
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}
# llama.cpp's names for the pre-tokenizer splits of the tokenizers it knows (tokenizer.json's "pre_tokenizer"):
# the GPT-2 regex alone, digits split first (SmolLM), and the Llama 3 / Qwen2 split regexes.
_GPT2 = "gpt-2"
_SPLIT_REGEXES = {
    r"\p{N}{1,3}": "llama-bpe",
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*": "qwen2",
}


def gguf_refusal(config: Any, tokenizer: Any) -> None:
    """Raise UniftError unless this model can be written as a GGUF file by export_gguf."""
    why = ""
    model_type = getattr(config, "model_type", "")
    if model_type not in ARCHITECTURES:
        why = (f"its architecture is {model_type or '?'}, and unift writes "
               f"{', '.join(sorted(ARCHITECTURES))} only")
    elif (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        why = "it uses scaled RoPE, which unift's writer does not describe"
    elif _bpe_model(tokenizer).get("type") != "BPE" or not _bpe_model(tokenizer).get("merges"):
        why = "its tokenizer is not a byte-level BPE (SentencePiece tokenizers are not written)"
    if why:
        raise UniftError(f"--export gguf: cannot export this model: {why}; the merged folder converts with "
                         "llama.cpp's convert_hf_to_gguf.py")


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _bpe_model(tokenizer: Any) -> dict:
    return _tokenizer_json(tokenizer).get("model", {})


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE ("default" where it is not one it
    knows: llama.cpp then splits as Llama 3 does, which may tokenize some text differently)."""
    pre = _tokenizer_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        for marker, name in _SPLIT_REGEXES.items():
            if marker in regex:
                return name
    log.warning("the tokenizer's pre-tokenizer (%s) is not one unift names for llama.cpp; the GGUF file says "
                "'default': check llama.cpp's tokenization of this model", "+".join(map(str, kinds)) or "none")
    return "default"


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores q/k rows with the two rotary halves apart; GGML interleaves them, head by head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_names(config: Any) -> Any:
    """The gguf package's HF -> GGUF tensor name map for this model's architecture."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type][0])
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def to_gguf_layout(key: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """A weight (or bias, or a LoRA B matrix: its rows are the weight's) in the order llama.cpp reads it."""
    if not ARCHITECTURES[config.model_type][1]:
        return tensor
    heads = config.num_attention_heads
    if ".self_attn.q_proj." in key:
        return _permute_rotary(tensor, heads)
    if ".self_attn.k_proj." in key:
        return _permute_rotary(tensor, config.num_key_value_heads or heads)
    return tensor


def new_writer(path: Path, config: Any, name: str) -> Any:
    """A GGUFWriter for this model's architecture with the model's shape written (shared with the LoRA writer)."""
    import gguf

    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type][0])]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    return writer


def _add_shape(writer: Any, config: Any) -> None:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer: Any, folder: Path, tokenizer: Any, vocab_size: int) -> None:
    """The byte-level BPE vocabulary by id (special tokens as control tokens), merges, special token ids
    and the chat template, all from the tokenizer files saved in `folder`."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {tok.content: tok.special for tok in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def export_gguf(folder: Path, model: Any, path: Path | None = None, name: str | None = None,
                quant: str | Quant | None = None) -> Path:
    """Write `folder/model.gguf` from a merged model and the tokenizer saved in `folder`: F32, or F16 for
    half-precision weights, unless `quant` names another type (unift.inference.gguf_quant.QUANTS)."""
    try:
        import gguf
    except ImportError as err:
        raise UniftError("--export gguf needs the gguf package: pip install gguf") from err
    from unift.models import load_tokenizer

    config = model.config
    tokenizer = load_tokenizer(str(folder))
    gguf_refusal(config, tokenizer)
    half = model.dtype in (torch.float16, torch.bfloat16)
    chosen = resolve_quant(quant, half)
    path = path or folder / GGUF_NAME
    # llama.cpp's quantizer (K-quants) reads a GGUF file: this one is written at full precision beside it first.
    direct = chosen if chosen.tensor_type else resolve_quant("f16" if half else "f32", half)
    target = path if chosen.tensor_type else Path(tempfile.mkstemp(suffix=".gguf", dir=path.parent)[1])
    try:
        writer = new_writer(target, config, name or folder.name)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_shape(writer, config)
        writer.add_file_type(getattr(gguf.LlamaFileType, direct.file_type))
        _add_tokenizer(writer, folder, tokenizer, config.vocab_size)
        names = gguf_tensor_names(config)
        tied = getattr(config, "tie_word_embeddings", False)
        for key, tensor in model.state_dict().items():
            if (key == "lm_head.weight" and tied) or key.endswith("rotary_emb.inv_freq"):
                continue  # llama.cpp reuses the token embeddings; RoPE frequencies come from the metadata
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UniftError(f"--export gguf: no GGUF name for tensor {key}")
            array, tensor_type = tensor_array(to_gguf_layout(key, tensor.detach().float(), config), direct)
            writer.add_tensor(gguf_name, array, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if not chosen.tensor_type:
            quantize_file(target, path, chosen)
    finally:
        if target != path:
            target.unlink(missing_ok=True)
    return path
