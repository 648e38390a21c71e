"""The attention used while training: torch's SDPA, made fast on CPUs and aware of packed rows.

Two things transformers' own `sdpa` attention does not do:
- On a CPU, SDPA's bf16 backward pass is slow (measured on AVX512-BF16/AMX: 8.8 ms per layer against
  3.8 ms for the same attention in fp32, batch 4 x 128 tokens). While gradients are needed the scores
  are therefore computed in fp32 from bf16 inputs, which is both faster and more precise; inference keeps
  bf16, where the forward pass alone is fast.
- A packed row (several examples one after another, see unift.accel.packing) arrives with the examples'
  boundaries (`cu_seq_lens_q`); each example attends only to itself, computed example by example with a
  plain causal mask instead of one row-long block-diagonal mask (half the time on a CPU).
"""

from __future__ import annotations

import contextlib

import torch

NAME = "unift_sdpa"


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """[1, heads, T, dim] as a contiguous fp32 [1, T, heads, dim]: each example one block of memory. The
    models hand over q, k, v as transposed views of token-major tensors, so only the cast copies."""
    return x.transpose(1, 2).float().contiguous()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # a view, no copy: the kernels take strided inputs


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention example by example over a packed row, computed in fp32 from (and keeping) the
    half-precision q, k, v: the fp32 copies autograd would keep cost twice the memory. Everything is held
    token-major, so an example's slice is contiguous and the output needs no copy to go back to the model
    (measured: about 15% less time per layer than heads-first slices, which each kernel call copied)."""

    @staticmethod
    def forward(ctx, query, key, value, edges: list[int], scale: float | None):
        q, k, v = _token_major(query), _token_major(key), _token_major(value)  # one cast per layer
        out = torch.empty(q.shape, dtype=query.dtype, device=query.device)
        lses = []
        for s, e in zip(edges[:-1], edges[1:]):
            piece, lse = _FLASH(_heads_first(q[:, s:e]), _heads_first(k[:, s:e]), _heads_first(v[:, s:e]),
                                0.0, True, scale=scale)
            out[:, s:e] = _heads_first(piece)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.edges, ctx.scale = edges, scale
        return _heads_first(out)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lses = ctx.saved_tensors
        q, k, v, g = _token_major(query), _token_major(key), _token_major(value), _token_major(grad)
        o = out.float()
        grads = [torch.empty((1, t.shape[2], t.shape[1], t.shape[3]), dtype=t.dtype, device=t.device)
                 for t in (query, key, value)]
        for (s, e), lse in zip(zip(ctx.edges[:-1], ctx.edges[1:]), lses):
            parts = _FLASH_BACKWARD(*(_heads_first(t[:, s:e]) for t in (g, q, k, v, o)), lse, 0.0, True,
                                    scale=ctx.scale)
            for target, part in zip(grads, parts):
                target[:, s:e] = _heads_first(part)
        return (*(_heads_first(t) for t in grads), None, None)


def training_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for extra in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(extra, None)
    dtype = query.dtype
    on_cpu_half = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if bounds is not None and query.shape[0] == 1 and on_cpu_half and not dropout and torch.is_grad_enabled():
        edges = [int(b) for b in bounds.tolist()]
        with torch.autocast("cpu", enabled=False):
            out = _PackedCausalAttention.apply(query, key, value, edges, scaling)
        return out.transpose(1, 2).contiguous(), None
    upcast = on_cpu_half and torch.is_grad_enabled()
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    # autocast would cast the fp32 inputs straight back to bf16 inside SDPA
    with torch.autocast(query.device.type, enabled=False) if upcast else contextlib.nullcontext():
        if bounds is not None and query.shape[0] == 1:
            edges = bounds.tolist()
            pieces = [
                sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                       scaling=scaling, dropout=dropout, **kwargs)[0]
                for s, e in zip(edges[:-1], edges[1:]) if e > s
            ]
            out = torch.cat(pieces, dim=1)  # [1, tokens, heads, head_dim]
        else:
            out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                         dropout=dropout, **kwargs)[0]
    return out.to(dtype), None


def register() -> str:
    """Make NAME a valid attn_implementation (attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, training_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
