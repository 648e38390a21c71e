"""The causal-LM loss computed only where there are labels, without materialising the logits.

transformers computes the vocabulary projection for every position, upcasts all of it to fp32 and then
throws most of it away: prompt tokens carry no label. Here the final hidden states of the labelled
positions are gathered first, and the projection, log-softmax and gradient are computed chunk by chunk
inside one autograd function whose forward already produces the gradient of the hidden states. The
full [tokens x vocabulary] logits never exist, in any dtype. The result equals transformers' loss
(mean over label tokens, or sum / num_items_in_batch under gradient accumulation), as tests check.
"""

from __future__ import annotations

import torch

# Logits computed at once: 2M values (8 MiB in fp32; 32 rows of a 49k vocabulary). The chunk is alive at
# the moment activations peak (the end of the forward pass): measured on the standard workload, 8M-value
# chunks raised peak RSS by ~140 MB at the same speed (the head's matmul is not faster in bigger chunks).
CHUNK_ELEMENTS = 1 << 21
ROWS_MULTIPLE = 32  # chunks are filled up to a multiple of this many rows


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, target) * scale, gradient computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, chunk: int):
        need_hidden = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start:start + chunk].to(weight.dtype)
            target = targets[start:start + chunk]
            real = rows.shape[0]
            if real % ROWS_MULTIPLE:  # a few chunk shapes instead of one per step (see unift.data.collate)
                rows = torch.cat([rows, rows.new_zeros(-real % ROWS_MULTIPLE, rows.shape[1])])
                target = torch.cat([target, target.new_zeros(rows.shape[0] - real)])
            logits = rows @ weight.t()
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            logits = logits.float()  # as transformers: projection in the model's dtype, softmax in fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1))[:real].sum()
            if need_hidden or need_weight or need_bias:
                # d(loss)/d(logits) = softmax - one_hot(target); the reduction scale is applied to the
                # (much smaller) products below instead of to the logits
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(target.shape[0], device=probs.device), target] -= 1
                probs[real:] = 0  # the filler rows contribute nothing
                if need_hidden:
                    grad_rows = (probs.to(weight.dtype) @ weight)[:real]
                    grad_hidden[start:start + real] = grad_rows.float().mul_(scale).to(hidden.dtype)
                if need_weight:
                    grad_weight.add_(probs.t() @ rows.float(), alpha=scale)
                if need_bias:
                    grad_bias.add_(probs.sum(0), alpha=scale)
            del logits
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = []
        for present, dtype in zip(ctx.present, ctx.dtypes):
            grads.append((next(saved) * grad_out).to(dtype) if present else None)
        return (*grads, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, scale: float, chunk: int | None = None) -> torch.Tensor:
    """`scale * sum(cross_entropy(hidden @ weight.T + bias, targets))` for hidden [N, H], targets [N]."""
    chunk = chunk or max(ROWS_MULTIPLE, CHUNK_ELEMENTS // weight.shape[0] // ROWS_MULTIPLE * ROWS_MULTIPLE)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, scale, chunk)
