"""--optim badam: BAdam (Luo et al., 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for
Large Language Models"), block coordinate descent with the badam package's BlockOptimizer around torch's
AdamW. One block, a decoder layer, trains at a time while the others are frozen; every
--badam_switch_every optimizer steps the next block takes over with a fresh AdamW state. Gradients and
AdamW's moments then exist for one layer instead of the whole model. The embeddings, the final norm and the
head never train, as in the package's and LLaMA-Factory's default.

unift keeps a fully trained model in fp32 (the weights are their own master copy). The package also keeps
an fp32 copy of the active block for models stored in bf16, so here that copy is redundant: one layer's
weights more, kept so that the package's step runs unchanged."""

from __future__ import annotations

from typing import Any

import torch

from unift.compat.badam_blocks import BlockAdam
from unift.peft.methods.freeze import decoder_layers


def build_block_optimizer(model: Any, *, lr: float, weight_decay: float, switch_every: int,
                          switch_mode: str) -> BlockAdam:
    """BAdam over `model`'s decoder layers, one block per layer."""
    stack, count = decoder_layers(model)
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return BlockAdam(base, list(model.named_parameters()), [f"{stack}.{i}." for i in range(count)],
                     switch_every, switch_mode)


def badam_optimizer(args: Any) -> tuple[Any, dict[str, Any]]:
    """The Trainer's optimizer_cls_and_kwargs for --optim badam. transformers 5 calls a builder that is no
    torch Optimizer class, then calls the result with (model, **kwargs)."""
    return (lambda: build_block_optimizer,
            {"lr": args.learning_rate, "weight_decay": args.weight_decay, "switch_every": args.badam_switch_every,
             "switch_mode": args.badam_switch_mode})
