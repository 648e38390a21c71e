"""The training forward pass of a causal LM: backbone, then the label-only loss (unift.accel.loss), with
packed rows (unift.accel.packing) routed to whatever the family needs to keep examples apart.

It replaces `forward` on the one model instance being trained (the transformers model inside the
PeftModel), so PEFT's wrappers, DDP and the Trainer call it as before. Calls without labels (generation,
evaluation of logits) go to the model's own forward unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from unift.accel.loss import linear_cross_entropy
from unift.accel.packing import ALIBI_BLOCKS, AlibiBlocks
from unift.data.tokenize import IGNORE_INDEX

log = logging.getLogger("unift")


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                   num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' causal-LM loss (position t predicts label t+1; mean over label tokens, or the sum over
    num_items_in_batch when the Trainer accumulates gradients), projecting only the labelled positions."""
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    targets = shifted[keep]
    if num_items_in_batch is None:
        denominator = max(1, int(targets.numel()))
    else:
        denominator = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP) intact for a batch without labels
    return linear_cross_entropy(hidden[keep], head.weight, head.bias, targets.to(hidden.device),
                                1.0 / denominator)


def decoder_blocks(backbone: nn.Module, count: int) -> nn.ModuleList | None:
    for child in backbone.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    return None


class TrainingForward:
    """Installed with `install`; `uninstall` restores the model's own forward."""

    def __init__(self, model: nn.Module, packing: str | None, label_only: bool = True) -> None:
        self.model = model
        self.label_only = label_only
        self.original = model.forward
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.packing = packing
        self.alibi = None
        if packing == ALIBI_BLOCKS:
            blocks = decoder_blocks(self.backbone, model.config.num_hidden_layers)
            self.alibi = AlibiBlocks(blocks, model.config.num_attention_heads)

    @classmethod
    def supported(cls, model: nn.Module) -> str:
        """'' if the label-only loss can stand in for this model's own, else why not."""
        if not type(model).__module__.startswith("transformers."):
            # Its backbone's outputs and its handling of packed rows (cu_seq_lens) are unknown: a packed row
            # would silently attend across examples.
            return "it runs its own modelling code (--trust_remote_code)"
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            return "its output layer is not a plain linear layer"
        if getattr(model, getattr(model, "base_model_prefix", ""), None) is None:
            return "its backbone cannot be called on its own"
        if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
            return "it rescales its logits"
        return ""

    def install(self) -> None:
        # A plain function, not this object's bound method: accelerate's mixed precision re-binds a bound
        # `forward.__func__` to the model (full and freeze tuning under bf16 autocast), which would call
        # this class's forward with the model as `self`.
        def forward(*args, **kwargs):
            return self.forward(*args, **kwargs)

        self._installed = forward
        self.model.forward = forward

    def uninstall(self) -> None:
        installed = getattr(self, "_installed", None)
        current = self.model.__dict__.get("forward")
        if current is not None and current is installed:
            del self.model.forward
        elif self.model.__dict__.get("_original_forward") is installed:  # accelerate wrapped it for autocast
            del self.model.forward
            del self.model._original_forward
        if self.alibi is not None:
            self.alibi.remove()

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                cu_seq_lens_q=None, pad_tokens=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        if cu_seq_lens_q is not None:
            cu_seq_lens_q = cu_seq_lens_q.reshape(-1)  # the collator's [1, n + 1]
            if self.packing == ALIBI_BLOCKS:
                kwargs.pop("position_ids", None)  # Bloom has none: ALiBi comes from the hooks
                self.alibi.set(cu_seq_lens_q)
            else:
                kwargs["cu_seq_lens_q"] = cu_seq_lens_q
                kwargs["cu_seq_lens_k"] = cu_seq_lens_q
        try:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if self.alibi is not None:
                self.alibi.set(None)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if not self.label_only:  # the model's own loss over every position's logits
            logits = self.head(hidden)
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                            num_items_in_batch=num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        loss = causal_lm_loss(hidden, labels, self.head, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None)
