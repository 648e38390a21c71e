"""transformers' Trainer writes a checkpoint straight into <run>/checkpoint-N. unift stages it (written
elsewhere, renamed into place once whole: unift.train.checkpoints), which needs two private methods of
the Trainer: `_save_checkpoint(model, trial)`, which writes into `self._get_output_dir(trial)`, and
`_get_output_dir(trial)` itself (transformers 5.25). The overrides below only hand over to public methods
of unift's mixin; tests/test_compat.py fails when those signatures or that call change."""

from __future__ import annotations

from typing import Any


class CheckpointOverrides:
    """Mixed in before the Trainer. The class that uses it defines `checkpoint_dir(run_dir) -> str` (where
    the Trainer writes now) and `save_checkpoint(model, trial, run_dir, write)`, where `write()` is the
    Trainer's own save into checkpoint_dir."""

    def _get_output_dir(self, trial: Any) -> str:
        return self.checkpoint_dir(super()._get_output_dir(trial))  # type: ignore[misc, attr-defined]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = super()._get_output_dir(trial)  # type: ignore[misc]

        def write() -> None:
            super(CheckpointOverrides, self)._save_checkpoint(model, trial)  # type: ignore[misc]

        self.save_checkpoint(model, trial, run_dir, write)  # type: ignore[attr-defined]
