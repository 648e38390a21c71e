"""Log-likelihood of answer tokens given their context, batched: the one computation behind perplexity
and multiple-choice scoring.

A row is (input_ids, labels) with IGNORE_INDEX on the context, exactly as training encodes a conversation,
so the mean NLL of a row is the loss training reports for it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unift.data import IGNORE_INDEX

Row = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Scored:
    """Summed negative log-likelihood (nats) of a row's labelled tokens, and how many there were."""

    nll: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan


def keep_last(row: Row, max_len: int | None) -> Row:
    """Cut a row that is too long from the left: the answer and the context right before it stay."""
    ids, labels = row
    if max_len and len(ids) > max_len:
        return ids[-max_len:], labels[-max_len:]
    return row


def last_answer_labels(labels: list[int]) -> list[int]:
    """Only the final answer is scored: earlier answers (solved examples in context) are context."""
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


# A forward pass's logits are at most this many values (fp32: 1 GiB), however large --batch_size is.
LOGITS_BUDGET = 1 << 28


def _chunks(order: list[int], lengths: list[int], batch_size: int, vocab: int) -> list[list[int]]:
    """Consecutive runs of `order` (sorted by length) of at most batch_size rows and LOGITS_BUDGET logits."""
    chunks: list[list[int]] = []
    for i, length in zip(order, lengths):
        if chunks and len(chunks[-1]) < batch_size and (len(chunks[-1]) + 1) * length * vocab <= LOGITS_BUDGET:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) causal LM can compute logits for its last positions only: the
    vocabulary head on every prompt position is a fifth of a small model's work, its fp32 logits GBs."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def score_rows(model, rows: Sequence[Row], pad_id: int, batch_size: int = 8,
               max_len: int | None = None) -> list[Scored]:
    """NLL of every row's labelled tokens, batched with right padding, in the order given.

    Rows are batched by length (similar lengths together, less padding) and put back in order. Logits
    are computed from the chunk's first answer position on, where the model allows it, and taken from
    the end of the output, as prompt tuning and p-tuning prepend virtual positions."""
    rows = [keep_last(r, max_len) for r in rows]
    trim = accepts_logits_to_keep(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    results: list[Scored | None] = [None] * len(rows)
    device = next(model.parameters()).device
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    for chunk in _chunks(order, [len(rows[i][0]) for i in order], batch_size, vocab):
        width = max(len(rows[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            row_ids, row_labels = rows[i]
            ids[j, :len(row_ids)] = torch.tensor(row_ids)
            labels[j, :len(row_labels)] = torch.tensor(row_labels)
            mask[j, :len(row_ids)] = 1
        # position t predicts token t+1: only positions from the chunk's first labelled one on need logits
        labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(labelled[0]) if trim and len(labelled) else 0
        extra = {"logits_to_keep": width - first} if trim else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
        logits = logits[:, -(width - first):]
        target = labels[:, 1 + first:].to(logits.device)
        where = target != IGNORE_INDEX
        picked = logits[:, :-1][where].float()
        nll = torch.nn.functional.cross_entropy(picked, target[where], reduction="none")
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device)
        per_row.index_add_(0, where.nonzero()[:, 0], nll.double())
        counts = where.sum(dim=1)
        for j, i in enumerate(chunk):
            results[i] = Scored(float(per_row[j]), int(counts[j]))
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class Perplexity:
    """The seed reports' figure (mean over examples of exp(mean answer NLL)) and the corpus-level one."""

    mean_example: float  # mean_i exp(NLL_i / n_i)
    corpus: float  # exp(sum NLL / sum n): every answer token weighs the same
    mean_loss: float  # mean_i NLL_i / n_i, the training loss's definition per example
    examples: int
    tokens: int


def perplexity(scored: Sequence[Scored]) -> Perplexity:
    kept = [s for s in scored if s.tokens]
    if not kept:
        return Perplexity(math.nan, math.nan, math.nan, 0, 0)
    tokens = sum(s.tokens for s in kept)
    return Perplexity(
        mean_example=sum(math.exp(s.mean_nll) for s in kept) / len(kept),
        corpus=math.exp(sum(s.nll for s in kept) / tokens),
        mean_loss=sum(s.mean_nll for s in kept) / len(kept),
        examples=len(kept), tokens=tokens,
    )
