"""The badam package's BlockOptimizer as unift trains with it (--optim badam; unift.train.badam builds it).
Imported where it is used, not by unift.compat itself: it imports the badam package, an optional extra."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from badam import BlockOptimizer

log = logging.getLogger("unift")


class BlockAdam(BlockOptimizer):
    """The package's BlockOptimizer with three changes. Its messages go to unift's log instead of stdout.
    Each block trains exactly --badam_switch_every steps. Its place in the block order (the random order
    included: torch's generator, which the run's seed sets) is saved in checkpoints, so a resumed run goes on
    with the block it stopped in. Overrides the package's private `_update_active_block_idx()` (badam 1.4)
    and calls its `step_single_gpu`; tests/test_compat.py fails when either changes."""

    def __init__(self, base: torch.optim.Optimizer, named_parameters: list[tuple[str, Any]], prefixes: list[str],
                 switch_every: int, switch_mode: str) -> None:
        self._order: list[int] = []  # random mode: the blocks still to train in this round
        self.active_block = 0
        if switch_mode == "random":
            self._order = torch.randperm(len(prefixes)).tolist()
            start = self._order.pop()
        else:
            start = len(prefixes) - 1 if switch_mode == "descending" else 0
        with warnings.catch_warnings():
            # It warns, naming every parameter, that the weights are fp32 rather than bf16 (see above).
            warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16/bf16")
            super().__init__(base, named_parameters, block_prefix_list=[[p] for p in prefixes],
                             switch_block_every=switch_every, start_block=start, switch_mode=switch_mode, verbose=0)
        self.state_dict = self._state_dict  # the package binds state_dict to the inner AdamW's

    def switch_trainable_params(self, verbose: int | None = None) -> None:
        self.active_block = self.current_block_idx
        super().switch_trainable_params(verbose=0)
        every = self.switch_block_every
        log.info("badam: %s trains%s (block %d of %d, %s order, %d step%s each)",
                 self.block_prefix_list[self.active_block][0].rstrip("."),
                 f" after step {self.global_step}" if self.global_step else "", self.active_block + 1,
                 self.block_num, self.switch_mode, every, "" if every == 1 else "s")

    def step(self, *args: Any, **kwargs: Any) -> None:
        # The package switches when (steps done + 1) is a multiple of N, so its first block trains N - 1
        # steps; here each block trains N. One process only (unift refuses ZeRO-3, the package's other path).
        self.step_single_gpu(*args, **kwargs)
        if self.global_step % self.switch_block_every == 0:
            self.switch_trainable_params()
            if torch.cuda.is_available():  # hand the old block's copy and moments back to the GPU
                torch.cuda.empty_cache()

    def _update_active_block_idx(self) -> None:
        if self.switch_mode != "random":
            super()._update_active_block_idx()
            return
        if not self._order:  # the package prints each new round's order; this is the same draw, unprinted
            self._order = torch.randperm(self.block_num).tolist()
        self.current_block_idx = self._order.pop()

    def _state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["badam"] = {"active": self.active_block, "next": self.current_block_idx, "order": list(self._order),
                          "step": self.global_step}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        where = state_dict.pop("badam", None)
        if where is not None:
            self.global_step = where["step"]
            if where["active"] != self.active_block:
                # Train the block the checkpoint was training, with fp32 copies of the resumed weights, so that
                # the saved AdamW state matches the parameters it was saved for. (accelerate reloads the state
                # it just took, to place it on the device: then the block is the same.)
                self.current_block_idx = where["active"]
                self.switch_trainable_params()
            self.current_block_idx, self._order = where["next"], list(where["order"])
        self.base_optimizer.load_state_dict(state_dict)
