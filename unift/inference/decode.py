"""unift's own decode loop over the KV cache, for continuous batching (unift.inference.batching drives it).

A `RunningBatch` holds the rows being decoded: their KV cache (a transformers `DynamicCache`, one row
per answer, all rows aligned at the right with left padding), the attention mask over the cache's
columns, the token ids in the cache (for the repetition penalties) and each row's next token to feed.
Between steps, newcomers are prefilled together (left-padded among themselves) and merged in, and rows
that are done leave (their cache rows are dropped, and columns of left padding no row needs any more are
cut). Position ids come from the attention mask as `generate` computes them for a left-padded batch, so a
row sees the positions and keys it would see alone.

`static_reason` says when this loop must not be used, because it would not decode as `model.generate`
does: see the module docstring of unift.inference.batching.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from unift.inference.settings import GenerationSettings
from unift.inference.streams import _Request


class NotContinuous(Exception):
    """The model's forward did not hand back a cache this loop can manage (found at the first prefill)."""


def _active(value: Any, neutral: Any = None) -> bool:
    return value is not None and value != neutral and value != [] and value is not False


# generation_config fields the loop does not implement, each with the test for "it changes decoding" that
# `generate` applies; a checkpoint that sets one of these decodes through `generate` instead.
_UNSUPPORTED_CONFIG = {
    "guidance_scale": lambda v: _active(v, 1),
    "sequence_bias": _active, "bad_words_ids": _active, "forced_bos_token_id": _active,
    "forced_eos_token_id": _active, "exponential_decay_length_penalty": _active, "suppress_tokens": _active,
    "begin_suppress_tokens": _active, "watermarking_config": _active, "top_h": _active, "min_p": _active,
    "stop_strings": _active, "max_time": _active, "prompt_lookup_num_tokens": _active,
    "penalty_alpha": _active, "token_healing": _active, "use_mtp": _active, "cache_implementation": _active,
    "encoder_repetition_penalty": lambda v: _active(v, 1.0),
    "min_length": lambda v: v is not None and v > 0, "min_new_tokens": lambda v: v is not None and v > 0,
    "num_return_sequences": lambda v: v is not None and v > 1,
    "typical_p": lambda v: v is not None and v < 1.0,
    "epsilon_cutoff": lambda v: v is not None and 0.0 < v < 1.0,
    "eta_cutoff": lambda v: v is not None and 0.0 < v < 1.0,
    "remove_invalid_values": lambda v: v is True, "renormalize_logits": lambda v: v is True,
}


def _base_forward_params(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    return set(inspect.signature(base.forward).parameters)


def static_reason(model, settings: GenerationSettings) -> str | None:
    """Why `settings` on `model` must decode through `model.generate` (None: the loop can decode them).
    The Generator's own reasons (equal_lengths) and the cache check at the first prefill come on top."""
    if settings.seed is not None:
        return "a seed (its answer must be reproducible, so it runs alone)"
    if settings.num_beams != 1:
        return "beam search"
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "a prompt-learning adapter (its virtual tokens or prefix keys sit in front of the padding)"
    if "cache" not in _base_forward_params(model):
        return "a forward without transformers' `cache` argument (remote code)"
    config = getattr(model, "generation_config", None)
    if config is not None:
        config = copy.deepcopy(config)
        config.update(**settings.generate_kwargs())
        for name, changes in _UNSUPPORTED_CONFIG.items():
            if changes(getattr(config, name, None)):
                return f"generation_config.{name} (not implemented by the decode loop)"
    return None


class Sampler:
    """Next tokens from the last position's logits, with the logits processors `generate` would apply for
    these settings, built from transformers' public classes in `generate`'s order."""

    def __init__(self, settings: GenerationSettings) -> None:
        from transformers import (
            LogitsProcessorList,
            NoRepeatNGramLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.settings = settings
        self.ngram = (NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size)
                      if settings.no_repeat_ngram_size > 0 else None)
        self.warpers = LogitsProcessorList()
        if settings.do_sample:
            if settings.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=settings.top_k))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=settings.top_p))

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab]; ids and mask [rows, columns]: each row's tokens so far, left-padded."""
        from transformers import RepetitionPenaltyLogitsProcessor

        scores = logits.float()
        padding = (mask != 0).int().argmax(dim=1)  # leading pad columns per row (as generate counts them)
        if self.settings.repetition_penalty != 1.0:
            penalty = RepetitionPenaltyLogitsProcessor(float(self.settings.repetition_penalty),
                                                       prompt_ignore_length=padding)
            scores = penalty(ids, scores)
        if self.ngram is not None:  # per row, without its padding: pad runs are not n-grams of the answer
            scores = torch.cat([self.ngram(ids[i:i + 1, int(padding[i]):], scores[i:i + 1])
                                for i in range(scores.shape[0])])
        scores = self.warpers(ids, scores)
        if self.settings.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)


def _left_pad(t: torch.Tensor, width: int, dim: int, value: float = 0) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad, value=value)


def _standard_layers(cache: Any, rows: int, width: int) -> list | None:
    """The cache's layers when it is a plain DynamicCache holding exactly these rows and columns (no
    sliding window, no virtual tokens), else None."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or not cache.layers:
        return None
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            return None
        if layer.keys.shape[0] != rows or layer.keys.shape[-2] != width:
            return None
    return cache.layers


class RunningBatch:
    """The rows being decoded together and their KV cache; see the module docstring."""

    def __init__(self, model, sampler: Sampler, pad_id: int, eos: set[int], tokenizer) -> None:
        self.model = model
        self.sampler = sampler
        self.pad_id = pad_id
        self.eos = eos
        self.tokenizer = tokenizer
        self.rows: list[_Request] = []
        self.cache: Any = None
        self.mask = self.ids = self.pending = torch.empty(0, dtype=torch.long)
        # As generate does: only the last position's logits, where the model can skip the others.
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in _base_forward_params(model) else {}

    def admit(self, requests: list[_Request]) -> None:
        """Prefill the newcomers (left-padded among themselves), take their first tokens and merge them in."""
        device = self.model.device
        width = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, width - len(request.ids):] = torch.tensor(request.ids)
            mask[i, width - len(request.ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self._last_only)
        layers = _standard_layers(getattr(out, "cache", None), len(requests), width)
        if layers is None:
            raise NotContinuous(f"the forward of {type(self.model).__name__} returned no plain DynamicCache")
        tokens = self.sampler(out.logits[:, -1, :], ids, mask)
        for request, token in zip(requests, tokens.tolist()):
            request.accept(token, self.eos, self.tokenizer)
        if not self.rows:
            self.cache, self.mask, self.ids, self.pending, self.rows = out.cache, mask, ids, tokens, list(requests)
            return
        # Both sides aligned at the right: the shorter one gets more left padding (masked out).
        columns = max(self.mask.shape[1], width)
        for mine, theirs in zip(self.cache.layers, layers):
            mine.keys = torch.cat([_left_pad(mine.keys, columns, -2), _left_pad(theirs.keys, columns, -2)])
            mine.values = torch.cat([_left_pad(mine.values, columns, -2), _left_pad(theirs.values, columns, -2)])
        self.mask = torch.cat([_left_pad(self.mask, columns, 1), _left_pad(mask, columns, 1)])
        self.ids = torch.cat([_left_pad(self.ids, columns, 1, self.pad_id), _left_pad(ids, columns, 1, self.pad_id)])
        self.pending = torch.cat([self.pending, tokens])
        self.rows.extend(requests)

    def drop_done(self) -> list[_Request]:
        """Rows that are done or whose reader left leave the batch; returns them."""
        for request in self.rows:
            if request.cancel.is_set() and not request.done:
                request.finish("stop")
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return []
        gone = [r for r in self.rows if r.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0]
            return gone
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.ids, self.pending = self.mask[index], self.ids[index], self.pending[index]
        # Left padding that only the rows gone needed: cut those columns (attention cost grows with them).
        unused = int(self.mask.any(dim=0).int().argmax())
        if unused:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask, self.ids = self.mask[:, unused:], self.ids[:, unused:]
        return gone

    def step(self) -> None:
        """Feed every row its pending token and take the next one."""
        feed = self.pending[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(feed)], dim=1)
        self.ids = torch.cat([self.ids, feed], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1  # the fed token's place among the row's real ones
        out = self.model(input_ids=feed, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                         use_cache=True, **self._last_only)
        self.pending = self.sampler(out.logits[:, -1, :], self.ids, self.mask)
        for request, token in zip(self.rows, self.pending.tolist()):
            request.accept(token, self.eos, self.tokenizer)
