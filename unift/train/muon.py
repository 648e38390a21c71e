"""--optim muon: Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et
al., 2025, "Muon is Scalable for LLM Training") for the weight matrices of the hidden layers, AdamW for the
rest, in one torch Optimizer.

Muon replaces a matrix's update by its momentum orthogonalised with a few Newton-Schulz iterations
(torch.optim.Muon). It is meant for the matrices that map one hidden state to another:
the decoder layers' linear weights, or the LoRA A/B matrices of an adapter. The embeddings and the output
head are not such maps, and vectors (biases, norms) have nothing to orthogonalise: those keep AdamW, as in
both papers. torch's Muon with adjust_lr_fn="match_rms_adamw" (Moonshot's rule) scales each matrix's learning
rate by 0.2 x sqrt(max(rows, columns)), which gives its update about the RMS of AdamW's; so one
--learning_rate and one --weight_decay serve both halves.

The Trainer's schedule, checkpoints and unift's engine-neutral resume (unift.train.resume) expect one
optimizer with param_groups and a state keyed by parameter: MuonAdamW holds the groups and the state of both
halves and hands them to torch's Muon and AdamW each time it steps, so the arithmetic is torch's own."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from unift.errors import UniftError

log = logging.getLogger("unift")

MUON = "muon"  # the param_groups key that says which half a group is (it is saved with the groups)
ADJUST_LR = "match_rms_adamw"


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon over `matrices` and torch's AdamW over `others` (tensors or param groups), one Optimizer:
    its param_groups are Muon's then AdamW's (each tagged with MUON), its state is the two halves' state."""

    def __init__(self, matrices: Iterable[torch.Tensor], others: Iterable[Any], *, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.95) -> None:
        matrices, others = list(matrices), list(others)
        # torch's optimizers refuse an empty parameter list: a half with nothing to train is left out
        self._muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      adjust_lr_fn=ADJUST_LR) if matrices else None
        self._adamw = torch.optim.AdamW(others, lr=lr, betas=betas, eps=eps,
                                        weight_decay=weight_decay) if others else None
        groups = []
        for half, is_muon in ((self._muon, True), (self._adamw, False)):
            for group in half.param_groups if half is not None else ():
                group[MUON] = is_muon
                groups.append(group)
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for half, is_muon in ((self._muon, True), (self._adamw, False)):
            if half is None:
                continue
            # The groups and the state live here: load_state_dict replaces them, a schedule sets their lr,
            # a resume writes the state; the halves see the current ones at every step.
            half.param_groups = [group for group in self.param_groups if group[MUON] == is_muon]
            half.state = self.state
            half.step()
        return loss


def _embedding_prefixes(model: Any) -> tuple[str, ...]:
    """Names (with a trailing dot) of the modules whose parameters are the embeddings or the output head,
    with whatever an adapter put inside them (LoRA on the embeddings, modules_to_save copies)."""
    outer = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):  # a model class without the accessor
            module = None
        if module is not None:
            outer.append(module)
    return tuple(f"{name}." for name, module in model.named_modules()
                 if any(module is m for m in outer) or isinstance(module, torch.nn.Embedding))


def split_parameters(model: Any) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(Muon's, AdamW's) trained parameters by name. Muon's: the 2-D ones with both sides above 1 outside the
    embeddings and the head (a row or a column, such as IA3's scales, is a vector, not a map)."""
    outer = _embedding_prefixes(model)
    matrices, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and min(p.shape) > 1 and not name.startswith(outer)
        (matrices if is_matrix else others).append((name, p))
    return matrices, others


def _kinds(names: list[str]) -> str:
    """The distinct kinds of tensor in `names`: the part after the layer index (self_attn.q_proj), or the
    whole name outside the layers (model.embed_tokens), without '.weight'."""
    short = [re.split(r"\.\d+\.", name)[-1].removesuffix(".weight") for name in names]
    return ", ".join(dict.fromkeys(short)) or "none"


def build_muon_adamw(model: Any, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                     decayed: Callable[[Any], list[str]]) -> MuonAdamW:
    """MuonAdamW over `model`'s trained parameters. AdamW's are grouped as the Trainer groups them for
    adamw_torch (`decayed`: the Trainer's names that take weight decay; biases and norms do not)."""
    matrices, others = split_parameters(model)
    if not matrices:
        raise UniftError(f"--optim muon: {type(model).__name__} trains no weight matrix of its hidden layers "
                         f"(it trains {_kinds([n for n, _ in others])}); use another --optim such as adamw_torch")
    decay = set(decayed(model))
    groups = [{"params": [p for n, p in others if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in others if n not in decay], "weight_decay": 0.0}]
    log.info("--optim muon: Muon for %d matrices (%s); AdamW for %d tensors (%s)", len(matrices),
             _kinds([n for n, _ in matrices]), len(others), _kinds([n for n, _ in others]))
    return MuonAdamW([p for _, p in matrices], [g for g in groups if g["params"]], lr=lr,
                     weight_decay=weight_decay, betas=betas, eps=eps)


def muon_optimizer(trainer: Any) -> tuple[Any, dict[str, Any]]:
    """The Trainer's optimizer_cls_and_kwargs for --optim muon, from the Trainer's own settings (the learning
    rate, weight decay and AdamW's betas and epsilon that adamw_torch would get). transformers 5 calls a
    builder that is no torch Optimizer class, then calls the result with (model, **kwargs)."""
    settings = trainer.args
    return (lambda: build_muon_adamw,
            {"lr": settings.learning_rate, "weight_decay": settings.weight_decay,
             "betas": (settings.adam_beta1, settings.adam_beta2), "eps": settings.adam_epsilon,
             "decayed": trainer.get_decay_parameter_names})
