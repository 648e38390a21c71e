"""Batches for the Trainer: padded (one row per example) or padding-free (one row for the whole batch).

Both take the same examples in the same order, so a run learns the same thing either way; the
padding-free row only skips the pad positions (see unift.accel.packing for how the model keeps the
examples of a row apart).
"""

from __future__ import annotations

import torch

from unift.data.tokenize import IGNORE_INDEX


class PaddingCollator:
    """Right-pads input_ids with the pad token and labels with IGNORE_INDEX, to a width that is a multiple
    of `multiple_of` (see PackingCollator for why)."""

    def __init__(self, pad_token_id: int, multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.multiple_of = max(1, multiple_of)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        width += -width % self.multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackingCollator:
    """Rows -> one row of their concatenation, with restarting position ids and the examples' boundaries
    (`cu_seq_lens_q`, cumulative lengths as flash-attention kernels take them, with a batch dimension in
    front). The first token of each
    example gets no label: it has no earlier token of its own to be predicted from.

    The row is filled up to a multiple of `multiple_of` tokens with a last, label-free segment of pad
    tokens (`pad_tokens` says how many): a CPU's matrix-multiply library compiles a kernel for every new
    shape it meets (~9 ms each, dozens per step), so rows of a few lengths beat rows of every length."""

    def __init__(self, pad_token_id: int = 0, multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.multiple_of = max(1, multiple_of)

    def __call__(self, rows: list[dict]) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for row in rows:
            n = len(row["input_ids"])
            ids += row["input_ids"]
            labels += [IGNORE_INDEX, *row["labels"][1:n]]
            positions += range(n)
            bounds.append(bounds[-1] + n)
        fill = -len(ids) % self.multiple_of
        if fill:
            ids += [self.pad_token_id] * fill
            labels += [IGNORE_INDEX] * fill
            positions += range(fill)
            bounds.append(bounds[-1] + fill)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            # [1, examples + 1] and [1]: every tensor has the batch dimension first, which data-loader
            # wrappers (accelerate's dispatcher, for streams) slice along
            "cu_seq_lens_q": torch.tensor([bounds], dtype=torch.int32),
            "pad_tokens": torch.tensor([fill]),
        }


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, trained tokens) of a collated batch: pads excluded; trained = tokens with a label to
    predict (position t predicts label t+1, as the loss counts them)."""
    mask = batch.get("attention_mask")
    pad = batch.get("pad_tokens")
    real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()) - int(pad.sum() if pad is not None else 0)
    if "labels" not in batch:  # preference batches (TRL's collators) mark the answers instead
        return real, int(batch["completion_mask"].sum()) if "completion_mask" in batch else 0
    trained = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    return real, trained
