"""Padding-free batches (unift.data.collate.PackingCollator): the examples of a batch one after another in a
single row, no pad tokens.

The batch is the same one the padded path would build (same examples, same order, same optimizer
steps), so the model learns the same thing; only the pad positions, which every linear layer would
otherwise process, are gone. Each example must still see only itself:
- position ids restart at 0 for every example (rotary families), and the examples' boundaries travel
  with the batch (`cu_seq_lens_q`), which transformers' causal mask and unift's training attention
  (unift.accel.attention) use to keep attention inside each example;
- the first token of every example gets no label, as it has no earlier token of its own to be
  predicted from (in a padded batch it is never predicted either);
- Bloom (ALiBi, no position ids) gets a block-diagonal mask and per-example ALiBi biases on each block.
tests/test_accel.py proves, for every family, that the loss and the gradients of a packed batch equal
those of the examples run one by one.
"""

from __future__ import annotations

import torch

# How each family keeps packed examples apart (ModelSpec.packing).
POSITION_IDS = "position_ids"  # restarting position ids + boundaries: transformers' mask does the rest
ALIBI_BLOCKS = "alibi_blocks"  # Bloom: block-diagonal mask and per-example ALiBi on every block


def block_causal_allowed(bounds: torch.Tensor, device) -> torch.Tensor:
    """[T, T] booleans: True where a token may attend (an earlier or the same token of its own example)."""
    lengths = (bounds[1:] - bounds[:-1]).long().to(device)
    example = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    total = int(example.shape[0])
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril_()
    return causal & (example[:, None] == example[None, :])


def alibi_positions(bounds: torch.Tensor, device) -> torch.Tensor:
    """Each token's position inside its own example: [0..n1-1, 0..n2-1, ...]."""
    lengths = (bounds[1:] - bounds[:-1]).long().to(device)
    starts = torch.repeat_interleave(bounds[:-1].long().to(device), lengths)
    return torch.arange(int(lengths.sum()), device=device) - starts


class AlibiBlocks:
    """Forward pre-hooks on Bloom's blocks that hand each block the packed row's mask and ALiBi biases.

    BloomModel builds its mask and ALiBi from a 2D padding mask, which cannot describe several examples
    in one row; the hooks replace both, for the duration of one forward pass (between `set` calls)."""

    def __init__(self, blocks, num_heads: int) -> None:
        self.num_heads = num_heads
        self.bounds: torch.Tensor | None = None
        self.cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True) for b in blocks]

    def set(self, bounds: torch.Tensor | None) -> None:
        self.bounds, self.cache = bounds, {}

    def _hook(self, module, args, kwargs):
        if self.bounds is None:
            return args, kwargs
        dtype, device = kwargs["alibi"].dtype, kwargs["alibi"].device
        if dtype not in self.cache:
            from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

            allowed = block_causal_allowed(self.bounds, device)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
            slopes = _get_alibi_slopes(self.num_heads, device)
            alibi = slopes[:, None, None] * alibi_positions(self.bounds, device)[None, None, :]  # [heads, 1, T]
            self.cache[dtype] = (mask[None, None], alibi.to(dtype))
        kwargs["attention_mask"], kwargs["alibi"] = self.cache[dtype]
        return args, kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
