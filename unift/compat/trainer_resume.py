"""transformers' Trainer resumes only from its engine's own checkpoint layout. unift resumes a checkpoint
written under another engine or world size from the engine-neutral state it keeps beside it
(unift.train.resume), which means skipping three private steps of the Trainer's resume (transformers
5.25): `_load_from_checkpoint(resume_from_checkpoint, model)` (the weights), the engine's state loaded at
the end of `_prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)` (optimizer and
schedule), and `_load_rng_state(checkpoint)` (the RNG files, named by the old world size). The overrides
below only decide between the Trainer's way and unift's public methods; tests/test_compat.py fails when
those signatures, or where the engine's state loads, change."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


class ResumeOverrides:
    """Mixed in before the Trainer. The class that uses it defines `neutral_resume(checkpoint) -> bool`
    (load the neutral state instead of the engine's), `load_neutral_optimizer()` and
    `neutral_rng_file(checkpoint) -> Path | None` (this rank's RNG state in it)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.neutral_resume(resume_from_checkpoint):  # type: ignore[attr-defined]
            return  # the weights came from the neutral state before the engine wrapped the model
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any):
        if not self.neutral_resume(resume_from_checkpoint):  # type: ignore[attr-defined]
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)  # type: ignore[misc]
        prepared = super()._prepare_for_training(max_steps, train_dataloader, None)  # type: ignore[misc]
        self.load_neutral_optimizer()  # type: ignore[attr-defined]
        return prepared

    def _load_rng_state(self, checkpoint: Any) -> None:
        if not self.neutral_resume(checkpoint):  # type: ignore[attr-defined]
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]
        found = self.neutral_rng_file(checkpoint)  # type: ignore[attr-defined]
        if found is None:
            return
        # The Trainer's own loader (every device's generator), given the file under the name it looks for.
        args = self.args  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory() as folder:
            name = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
            os.symlink(Path(found).resolve(), Path(folder) / name)
            super()._load_rng_state(folder)  # type: ignore[misc]
