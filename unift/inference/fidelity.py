"""Merge fidelity: the merged folder loaded back as the inference commands load it (unift.loader), and its
GGUF export where one was written, against the adapter model it came from (base + adapter, unmerged).

Both are run teacher-forced over the same token ids: a few records of the run's own training data, rendered
with the run's template as training rendered them, else a few fixed probe conversations. Two figures per
comparison: the largest |Δlogit| over every position and vocabulary entry, and the mean per-token
KL(adapter || merged) in nats. The merge is refused when the mean KL exceeds --max_kl.

Both sides are computed in fp32 on the merge's device, so the figures measure the saved weights (their dtype
included), not the rounding of a half-precision forward pass. A run trained over a quantized base is also
compared with the adapter over that quantized base, as the inference commands serve it: the merge folds
into the full-precision base, so this gap is the base's quantization error. It is reported, not refused.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unift.data import encode_conversation, load_conversations
from unift.errors import UniftError
from unift.loader import load
from unift.models.loading import first_line
from unift.models.runcard import RunCard

# The default of --max_kl, nats per token. Measured on the embedded model (docs/after_training.md): faithful
# merges 3e-12 (fp32), 5e-7 (fp16), 1.6e-5 to 3.6e-4 (bf16: W + ΔW rounded), about what running the unmerged
# model in bf16 costs (4.7e-4); merge mistakes 1.9e-3 (the adapter left out of one layer), 2.3e-3 (its scale
# 10% low) and up (missing 1.7, doubled 0.59). 1e-3 lies between the two, ~3x from each.
DEFAULT_MAX_KL = 1e-3
# A few records are enough: a broken merge shows on every token. The logits kept for the comparison are
# tokens x vocabulary fp32 values (512 x 49,152: 100 MB), so the tokens are capped.
RECORDS = 4
MAX_TOKENS = 512
# The KL is summed over this many positions at a time, in fp64 (a faithful merge's KL is ~1e-12, below
# fp32's resolution of log-probabilities near -10), to bound the temporaries for large vocabularies.
CHUNK = 64
# When the run's data cannot be read here (a foreign adapter, data on another machine).
PROBES = [
    [{"role": "user", "content": "Write one sentence about the sea."},
     {"role": "assistant", "content": "The sea covers most of the planet and is never quite still."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 30?"},
     {"role": "assistant", "content": "12 + 30 = 42."}],
    [{"role": "user", "content": "Name three colours, then explain why the sky looks blue."},
     {"role": "assistant", "content": "Red, green and blue. Air scatters short (blue) wavelengths of sunlight "
                                      "more than long ones, so blue light reaches us from every direction."}],
]


@dataclass
class Probe:
    """The token rows the check runs on, where they came from, and the adapter model's logits on them."""

    rows: list[list[int]]
    source: str
    reference: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass(frozen=True)
class Gap:
    """How far one model's next-token distributions are from the reference's on the probe's tokens."""

    max_abs_logit_diff: float
    mean_kl: float  # nats per token, KL(reference || other), averaged over every position

    def __str__(self) -> str:
        return f"max |Δlogit| {self.max_abs_logit_diff:.2g}, mean KL {self.mean_kl:.2g} nats/token"


def _run_conversations(card: RunCard | None) -> tuple[list, str]:
    """The first RECORDS conversations of the run's training data and their names, or ([], why not)."""
    names = card.arguments.get("data") if card else None
    if not names:
        return [], "the run card names no data" if card else "no run card"
    dataset_dir = card.arguments.get("dataset_dir")
    try:
        conversations = load_conversations(list(names), Path(dataset_dir) if dataset_dir else None,
                                           limit=RECORDS)
    except Exception as err:  # noqa: BLE001 (whatever stops the data being read here, the probes stand in)
        return [], f"the run's data is not readable here: {first_line(err)}"
    return conversations, ", ".join(map(str, names))


def _encode(conversations: list, template: Any, tokenizer: Any) -> list[list[int]]:
    """Token rows as training encodes a conversation (template, special tokens), MAX_TOKENS in all."""
    rows: list[list[int]] = []
    budget = MAX_TOKENS
    for messages in conversations:
        try:
            ids = encode_conversation(messages, template, tokenizer, cutoff_len=budget).input_ids
        except Exception:  # noqa: BLE001 (a record this template cannot render is left out)
            continue
        if len(ids) > 1:
            rows.append(ids[:budget])
            budget -= len(rows[-1])
        if budget < 2:
            break
    return rows


def make_probe(card: RunCard | None, template: Any, tokenizer: Any) -> Probe:
    """The rows the check runs on: a few records of the run's data, else the fixed probe conversations."""
    conversations, names = _run_conversations(card)
    rows = _encode(conversations, template, tokenizer)
    if rows:
        return Probe(rows, f"{len(rows)} records of {names}")
    why = "the run's records could not be encoded" if conversations else names
    rows = _encode(PROBES, template, tokenizer)
    return Probe(rows, f"{len(rows)} probe conversations ({why})")


@torch.inference_mode()
def logits_on(model: Any, rows: Sequence[list[int]]) -> list[torch.Tensor]:
    """The model's fp32 logits on each row, one row per forward pass (no padding to reason about), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for row in rows:
        ids = torch.tensor([row], device=device)
        out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu())
    return out


def gap(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> Gap:
    """Max |Δlogit| and mean KL(reference || other) per position over rows of logits of equal shapes."""
    worst, kl_sum, count = 0.0, 0.0, 0
    for ref, oth in zip(reference, other):
        worst = max(worst, (ref - oth).abs().max().item())
        for start in range(0, len(ref), CHUNK):
            log_p = torch.log_softmax(ref[start:start + CHUNK].double(), dim=-1)
            log_q = torch.log_softmax(oth[start:start + CHUNK].double(), dim=-1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        count += len(ref)
    return Gap(worst, max(kl_sum / max(count, 1), 0.0))  # rounding may leave a faithful merge's sum at -1e-17


def _logits_of(load_model: Callable[[], Any], rows: Sequence[list[int]]) -> list[torch.Tensor]:
    """Load a model, run it on the rows, and hand its memory back before the next one loads."""
    logits = logits_on(load_model(), rows)
    release()
    return logits


def release() -> None:
    """Hand freed models' memory back (their reference cycles, the CUDA cache) before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(folder: Path, probe: Probe, *, model_type: str, device: str | None, trust: bool,
            gguf_file: str | None = None, trained: Callable[[], Any] | None = None,
            quantization_bit: int | None = None, max_kl: float = DEFAULT_MAX_KL,
            quant: str | None = None) -> dict[str, Any]:
    """The figures of the merged `folder` (and `folder/gguf_file`, written at --quant `quant`) against
    `probe.reference`. `trained` loads the adapter model as it was trained where that differs from the
    reference: over a quantized base."""
    merged = _logits_of(lambda: load(None, base_model=str(folder), model_type=model_type, trust_remote_code=trust,
                                     device=device, dtype="fp32").model, probe.rows)
    figures: dict[str, Any] = {"records": probe.source, "tokens": probe.tokens, "computed_in": "fp32",
                               "max_kl": max_kl, "merged": vars(gap(probe.reference, merged))}
    if gguf_file:
        figures["gguf"] = _gguf_gap(folder, gguf_file, probe, quant)
    if trained is not None:
        figures["quantized_base"] = {"bits": quantization_bit}
        try:
            as_trained = _logits_of(trained, probe.rows)
        except (UniftError, ImportError, RuntimeError, ValueError) as err:  # e.g. no bitsandbytes on this machine
            figures["quantized_base"]["not_measured"] = first_line(err)
        else:  # KL(as trained || merged): how far the merged model is from the one the adapter trained in
            figures["quantized_base"].update(vars(gap(as_trained, merged)))
    return figures


def _gguf_gap(folder: Path, gguf_file: str, probe: Probe, quant: str | None) -> dict[str, Any]:
    """The GGUF file read back with transformers' GGUF reader (it dequantizes), against the adapter model; a
    quantized file's gap is its quantization error, reported, not refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unift.inference.gguf_quant import resolve_quant

    config = AutoConfig.from_pretrained(str(folder))
    found: dict[str, Any] = {"quant": quant or "auto", "quantized": resolve_quant(quant, False).lossy}
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        # transformers builds a llama GGUF without biases (llama.cpp reads them): nothing to compare here
        found["not_measured"] = "transformers' GGUF reader leaves out a llama model's biases"
        return found
    exported = _logits_of(lambda: AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32).eval(), probe.rows)
    found.update(vars(gap(probe.reference, exported)))
    return found


def failure(figures: dict[str, Any]) -> str:
    """'' when the merged model (and its GGUF export) are within --max_kl of the adapter model, else why not."""
    limit = figures["max_kl"]
    for key, what in (("merged", "the merged model"), ("gguf", "the GGUF export")):
        found = figures.get(key)
        if not found or found.get("quantized") or "not_measured" in found:
            continue  # a quantized file's gap is what --quant chose: reported by summary, not refused
        if not found["mean_kl"] <= limit:  # `not <=`: a NaN fails too
            return (f"{what} departs from the adapter model on {figures['records']}: mean KL "
                    f"{found['mean_kl']:.3g} nats/token > --max_kl {limit:g} (max |Δlogit| "
                    f"{found['max_abs_logit_diff']:.3g})")
    return ""


def summary(figures: dict[str, Any]) -> str:
    """One line: what the check ran on and its figures."""
    parts = [f"merged vs adapter model on {figures['records']} ({figures['tokens']} tokens, fp32): "
             f"{Gap(**figures['merged'])} (--max_kl {figures['max_kl']:g})"]
    exported = figures.get("gguf")
    if exported and "not_measured" in exported:
        parts.append(f"GGUF export: not measured ({exported['not_measured']})")
    elif exported:
        what = Gap(exported["max_abs_logit_diff"], exported["mean_kl"])
        parts.append(f"GGUF export ({exported['quant']}, quantized: reported, not refused): {what}"
                     if exported.get("quantized") else f"GGUF export: {what}")
    quantized = figures.get("quantized_base")
    if quantized:
        found = (f"not measured ({quantized['not_measured']})" if "not_measured" in quantized else
                 Gap(quantized["max_abs_logit_diff"], quantized["mean_kl"]))
        parts.append(f"vs the adapter over its {quantized['bits']}-bit base, as trained: {found} (the base's "
                     "quantization error: the merge folds into the full-precision base)")
    return "; ".join(parts)
