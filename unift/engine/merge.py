"""Folding an adapter into its base model: a folder that plain `transformers` loads without unift.

The merged folder holds the weights, the run's tokenizer with a chat template that renders exactly the
run's prompt template (so `apply_chat_template` prompts as training did), and unift_merged.json. The merge
is checked before anything is written: the merged model's logits on a probe prompt must equal the adapter
model's. QLoRA: the adapter is folded into the base re-loaded in full precision and saved at
--compute_dtype (the 4-bit base cannot hold the sum), so the merged model differs slightly from the QLoRA
model, by the base's 4-bit rounding; docs/after_training.md says more.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from unift.data.templates import template_definition
from unift.errors import UniftError
from unift.loader import load
from unift.models.dtypes import merge_plan, saved_dtype, torch_dtype
from unift.models.hub import is_hub_adapter, resolve_adapter_dir
from unift.models.loading import first_line
from unift.models.runcard import MERGED_CARD, RunCard, read_card

log = logging.getLogger(__name__)

PROBE = [{"role": "user", "content": "Write one sentence about the sea."}]
# Relative tolerance of the built-in check: fp32 merges agree to ~1e-5 of the logit scale.
CHECK_RTOL = 1e-3


# ---- can it be merged? -------------------------------------------------------------------------------

def merge_refusal(card: RunCard, peft_config: Any) -> str:
    """'' when the adapter can be folded into the base weights, else the reason it cannot."""
    from unift.peft import registry

    method = registry.METHODS.get(card.peft_type)
    if method is not None:
        refusal = getattr(registry, "merge_refusal", None)
        if refusal is not None:
            reason = refusal(method, peft_config)
        else:
            reason = "" if method.mergeable else (method.merge_note or "")
        if reason:
            return reason
        if not method.mergeable:
            return f"--peft_type {card.peft_type} cannot be merged"
    if getattr(peft_config, "is_prompt_learning", False):
        return ("it learns virtual tokens fed to the model at every step, not changes to its weights, "
                "so there is nothing to fold into the base; serve it with the adapter instead")
    return ""


# ---- the chat template written with the merged model ----------------------------------------------------

def _jinja_expr(fmt: str, content: str, eos: str, bos: str) -> str:
    """A FormatTemplate format string as one Jinja expression: literals quoted (so the trim_blocks and
    lstrip_blocks settings transformers compiles with cannot eat any whitespace), joined with `~`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal))
        if name == "content":
            parts.append(content)
        elif name in ("eos", "bos"):
            parts.append(json.dumps(eos if name == "eos" else bos))
        elif name is not None:
            raise UniftError(f"template field {{{name}}} has no chat-template equivalent")
    return "(" + (" ~ ".join(parts) or '""') + ")"


def format_template_jinja(template: Any, eos: str, bos: str = "") -> str:
    """Jinja for transformers' apply_chat_template that renders like `template.render`.

    Checked against `render` by install_chat_template before it is used, so a template feature this
    translation misses is caught, never silently written."""
    def expr(fmt: str, content: str) -> str:
        return _jinja_expr(fmt, content, eos, bos)

    user, assistant = template.user, template.assistant
    observation = getattr(template, "observation", None) or user
    function_call = getattr(template, "function_call", None) or assistant
    system_block = expr(template.system, "system_text")
    in_user = bool(getattr(template, "system_in_user", False))
    return "".join([
        "{{ " + expr(template.prefix, '""') + " }}",
        "{% if messages and messages[0]['role'] == 'system' %}",
        "{% set system_text = messages[0]['content'] %}{% set turns = messages[1:] %}",
        "{% else %}{% set system_text = " + json.dumps(template.default_system) + " %}",
        "{% set turns = messages %}{% endif %}",
        # Llama 2 puts the system block inside the first user turn; the others put it first.
        "{% set ns = namespace(pending='') %}",
        ("{% if system_text %}{% set ns.pending = " + system_block + " %}{% endif %}") if in_user else
        ("{% if system_text %}{{ " + system_block + " }}{% endif %}"),
        "{% for message in turns %}",
        "{% if message['role'] == 'user' %}",
        "{% set text = ns.pending ~ message['content'] %}{% set ns.pending = '' %}",
        "{{ " + expr(user, "text") + " }}",
        "{% elif message['role'] == 'assistant' %}{{ " + expr(assistant, "message['content']") + " }}",
        "{% elif message['role'] in ['observation', 'tool'] %}{{ " + expr(observation, "message['content']") + " }}",
        "{% elif message['role'] == 'function_call' %}{{ " + expr(function_call, "message['content']") + " }}",
        "{% else %}{{ raise_exception('this template cannot render the role ' + message['role']) }}{% endif %}",
        "{% endfor %}",
    ])


def install_chat_template(tokenizer, template) -> bool:
    """Make the tokenizer's chat template render the run's template; True when it now does."""
    if getattr(template, "source", ""):  # a --template FILE.jinja: the merged tokenizer carries it as it is
        tokenizer.chat_template = template.source
        return True
    if getattr(template, "name", "auto") == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    jinja = format_template_jinja(template, tokenizer.eos_token or "", tokenizer.bos_token or "")
    samples = [
        PROBE,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = jinja
    for messages in samples:
        want = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if got != want:
            tokenizer.chat_template = previous
            log.warning("could not express template %s as a chat template; the merged folder keeps the "
                        "tokenizer's own (unift still prompts it right through unift_merged.json)", template.name)
            return False
    return True


# ---- merging -----------------------------------------------------------------------------------------

def _probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _fold(model, base_keys: frozenset[str], card: RunCard, tokenizer, template) -> tuple[Any, float]:
    """merge_and_unload, checked: no adapter weight left behind, and the merged model's logits on a probe
    prompt equal the adapter model's. Returns (merged model, max |Δlogit|)."""
    base = model.get_base_model()
    probe = tokenizer(template.render(PROBE, add_generation_prompt=True, tokenizer=tokenizer),
                      add_special_tokens=False, return_tensors="pt")["input_ids"].to(base.device)
    before = _probe_logits(model, probe)
    try:
        merged = model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError, TypeError, RuntimeError) as err:
        raise UniftError(f"cannot merge --peft_type {card.peft_type}: {first_line(err)}") from err
    leftover = set(merged.state_dict()) - base_keys
    if leftover:
        raise UniftError(f"merging --peft_type {card.peft_type} left adapter weights behind "
                         f"({sorted(leftover)[0]}, ...); it cannot be saved as a plain model")
    after = _probe_logits(merged, probe)
    diff = (after - before).abs().max().item()
    scale = before.abs().max().item() or 1.0
    log.info("merged model vs adapter model on a probe prompt: max |Δlogit| = %.2e (logits up to %.1f)",
             diff, scale)
    if diff > CHECK_RTOL * scale:
        raise UniftError(f"the merged model does not reproduce the adapter model (max |Δlogit| {diff:.3g}); "
                         "nothing was written")
    return merged, diff


def merge(
    adapter_dir: str,
    merged_dir: str,
    *,
    base_model: str | None = None,
    model_type: str | None = None,
    compute_dtype: str | None = None,
    trust_remote_code: bool | None = None,
    overwrite: bool = False,
    export: str | None = None,
    device: str | None = None,
    template: str | None = None,
) -> Path:
    """Fold the adapter of a run folder into its base; write `merged_dir`; return it. `template`: a name or
    a template file overriding the run card's (the merged folder then prompts with it)."""
    from peft import PeftConfig

    from unift import compat

    compat.apply()
    given = adapter_dir
    adapter_dir = resolve_adapter_dir(adapter_dir)  # ORG/NAME[@REVISION]: its snapshot in the hub cache
    card = read_card(adapter_dir, base_model=base_model, model_type=model_type, template=template)
    out = Path(merged_dir)
    if out.resolve() == Path(adapter_dir).resolve():
        raise UniftError("--merged_dir must differ from --adapter_dir")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UniftError(f"--merged_dir {out} exists and is not empty; pass --overwrite or choose another folder")
    if not card.holds_model:
        try:
            peft_config = PeftConfig.from_pretrained(adapter_dir)
        except (ValueError, OSError) as err:
            raise UniftError(f"{adapter_dir}: cannot read the adapter config: {first_line(err)}") from err
        reason = merge_refusal(card, peft_config)
        if reason:
            raise UniftError(f"cannot merge --peft_type {card.peft_type}: {reason}")
    if export and export != "gguf":
        raise UniftError(f"--export {export!r}: only gguf is supported")

    # Merged in fp32 (merge_plan); on a GPU when the fp32 weights fit on one, else on the CPU.
    trust = card.trust_remote_code if trust_remote_code is None else trust_remote_code
    loaded = load(adapter_dir, base_model=base_model, model_type=model_type, trust_remote_code=trust,
                  device=device, dtype=merge_plan(), card=card, template=template)
    model, tokenizer, template, spec = loaded.model, loaded.tokenizer, loaded.template, loaded.spec
    saved_dtype = torch_dtype(saved_dtype_of(compute_dtype, card, loaded.path, trust))
    if card.quantization_bit:
        log.info("the adapter was trained over a %d-bit base; merging it into the base re-loaded in full "
                 "precision and saving at %s", card.quantization_bit, str(saved_dtype).replace("torch.", ""))
    model.eval()
    if export == "gguf":
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        gguf_refusal(inner.config, tokenizer)  # refuse before the work, not after it
    if card.holds_model:
        # Nothing to fold: the run trained the model itself. The merged folder is that model, written as
        # any merge is (the chat template, unift_merged.json), so plain transformers and GGUF take it alike.
        log.info("%s holds the whole trained model (--peft_type %s): nothing to fold in, writing it as it is",
                 adapter_dir, card.peft_type)
        merged, diff = model, 0.0
    else:
        merged, diff = _fold(model, loaded.base_keys, card, tokenizer, template)

    merged = merged.to(saved_dtype)
    config = merged.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    install_chat_template(tokenizer, template)
    stop_on_end_of_turn(merged, tokenizer, template)
    tokenizer.padding_side = "left"  # what batched generation with a causal LM wants

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from unift.runtime import library_versions, write_json_atomic

        write_json_atomic(tmp / MERGED_CARD, {
            "model_type": spec.name, "template": template_definition(template), "peft_type": card.peft_type,
            "adapter_dir": given if is_hub_adapter(given) else str(Path(adapter_dir).resolve()), "base_model": card.base_model,
            "dtype": str(saved_dtype).replace("torch.", ""), "quantization_bit_trained": card.quantization_bit,
            "probe_max_abs_logit_diff": diff, "versions": library_versions(),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the merged model to %s (%s)", out, str(saved_dtype).replace("torch.", ""))
    if export == "gguf":
        log.info("wrote %s", export_gguf(out, merged))
    elif export:
        raise UniftError(f"--export {export!r}: only gguf is supported")
    return out


def stop_on_end_of_turn(model, tokenizer, template) -> None:
    """Tools that read only the merged folder (transformers, vLLM) stop where the template ends a turn."""
    from unift.data.templates import end_of_turn

    marker = end_of_turn(template, tokenizer)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(ids) != 1 or model.generation_config is None:
        return
    current = model.generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    if ids[0] not in current:
        model.generation_config.eos_token_id = [*current, ids[0]] if current else ids[0]


def saved_dtype_of(compute_dtype: str | None, card: RunCard, path: str, trust: bool) -> str:
    """unift.models.dtypes.saved_dtype, with the checkpoint's dtype read as saved, not as loaded here."""
    if (compute_dtype and compute_dtype != "auto") or card.quantization_bit:
        return saved_dtype(compute_dtype, card, None)
    from transformers import AutoConfig

    stored = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    return saved_dtype(None, card, getattr(stored, "dtype", None) or getattr(stored, "torch_dtype", None))


# ---- GGUF export (llama architecture, byte-level BPE tokenizers) ------------------------------------------

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


def export_gguf(folder: Path, model, path: Path | None = None) -> Path:
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
    writer.add_name(folder.name)
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
