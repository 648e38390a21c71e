"""GGUF export of a merged model (llama architecture, byte-level BPE tokenizers): one file that llama.cpp
and transformers' `from_pretrained(..., gguf_file=)` read."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unift.errors import UniftError

GGUF_NAME = "model.gguf"


def gguf_refusal(config, tokenizer) -> None:
    """Raise UniftError unless this model can be written as a GGUF file by export_gguf."""
    why = ""
    if getattr(config, "model_type", "") != "llama":
        why = f"its architecture is {getattr(config, 'model_type', '?')}, and unift writes llama only"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        why = "it has attention/MLP biases (InternLM-style), which unift's writer does not map"
    elif (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        why = "it uses scaled RoPE, which unift's writer does not describe"
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
        if model.get("type") != "BPE" or not model.get("merges"):
            why = "its tokenizer is not a byte-level BPE (SentencePiece tokenizers are not written)"
    if why:
        raise UniftError(f"--export gguf: cannot export this model: {why}; the merged folder converts with "
                         "llama.cpp's convert_hf_to_gguf.py")


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores q/k rows with the two rotary halves apart; GGML interleaves them, head by head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(folder: Path, model, path: Path | None = None, name: str | None = None) -> Path:
    """Write `folder/model.gguf` (F32, or F16 for half-precision weights) from a merged llama model and the
    tokenizer saved in `folder`: llama.cpp and transformers' `from_pretrained(..., gguf_file=)` read it."""
    try:
        import gguf
    except ImportError as err:
        raise UniftError("--export gguf needs the gguf package: pip install gguf") from err
    from unift.models import load_tokenizer

    config = model.config
    tokenizer = load_tokenizer(str(folder))
    gguf_refusal(config, tokenizer)
    half = model.dtype in (torch.float16, torch.bfloat16)
    path = path or folder / GGUF_NAME
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or folder.name)
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
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)

    # Tokenizer: the byte-level BPE vocabulary by id, special tokens marked as control tokens.
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {tok.content: tok.special for tok in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses the token embeddings
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UniftError(f"--export gguf: no GGUF name for tensor {key}")
        data = tensor.detach().float()
        if key.endswith("self_attn.q_proj.weight"):
            data = _permute_rotary(data, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            data = _permute_rotary(data, kv_heads)
        # Norm vectors stay F32 (as llama.cpp's converter writes them); matrices follow the model's dtype.
        array = data.numpy().astype("float16" if half and data.dim() > 1 else "float32")
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
