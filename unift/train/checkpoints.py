"""Checkpoints that survive a kill: each one is written to a staging folder and renamed into place, so the
newest `checkpoint-N` is always complete; Ctrl-C or SIGTERM asks for one last checkpoint before exiting;
the run folder is checked for room and writability before any weights load."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unift.compat.trainer_checkpoints import CheckpointOverrides
from unift.errors import UniftError
from unift.train.resume import NeutralResume, save_neutral

# Inside the run folder; transformers' get_last_checkpoint only matches `checkpoint-<digits>`, so a
# half-written checkpoint left here by a kill is never picked for a resume.
STAGING = ".staging"


def check_output_dir(path: str | Path, need_bytes: int = 0, flag: str = "--output_dir") -> Path:
    """The run folder exists, is writable, and its disk has `need_bytes` free; else one clear line."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".unift-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UniftError(f"{flag} {path}: not writable ({err.strerror or err})") from None
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        raise UniftError(f"{flag} {path}: {free / 2**20:.0f} MiB free, the checkpoints need about "
                         f"{need_bytes / 2**20:.0f} MiB")
    return folder


def checkpoint_bytes(trainable: int, keep: int) -> int:
    """What the run folder needs: `keep` checkpoints (+1 being written), each the fp32 adapter plus AdamW's
    two moments (12 bytes a trainable parameter) twice (the engine's own and the engine-neutral copy), the
    final adapter, and 16 MiB for tokenizer and logs."""
    per_checkpoint = 24 * trainable
    return per_checkpoint * (max(1, keep) + 1) + 4 * trainable + 16 * 2**20


def publish(staged: Path, final: Path) -> None:
    """Move a complete checkpoint into place with renames (atomic within one file system)."""
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted session
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


class AtomicCheckpoints(NeutralResume, CheckpointOverrides):
    """Trainer mixin: the Trainer writes each checkpoint into <run>/.staging/checkpoint-N (model, optimizer,
    scheduler, every rank's RNG state, trainer state, and the engine-neutral state that lets another engine or
    world size resume it: unift.train.resume); once all ranks are done, `before_publish` hooks run (the run
    card) and the folder is renamed to <run>/checkpoint-N, then old ones are rotated away. The Trainer's
    private methods this needs are overridden in unift.compat.trainer_checkpoints, which calls
    `checkpoint_dir` and `save_checkpoint` here."""

    _staging = False
    before_publish: list[Callable[[Path], None]]
    # Called on every rank with the staged folder, after the Trainer wrote it: an engine whose checkpoint
    # holds only shards (FSDP) adds the whole adapter there, so every checkpoint loads in plain peft.
    save_whole: Callable[[Path], None] | None = None

    def checkpoint_dir(self, run_dir: str) -> str:
        """Where the Trainer writes checkpoints now: the staging folder while one is being saved."""
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def save_checkpoint(self, model: Any, trial: Any, run_dir: str, write: Callable[[], None]) -> None:
        """Stage the checkpoint the Trainer writes (`write()`), then publish it whole."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = Path(run_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        self._staging = True
        try:
            write()
        except OSError as err:  # a disk that filled up during the run, a folder that went away
            shutil.rmtree(run_dir / STAGING / name, ignore_errors=True)
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
            raise UniftError(f"cannot write {name} in {run_dir} ({err.strerror or err}); the last complete "
                             f"checkpoint is {Path(last).name if last else 'none'}") from None
        finally:
            self._staging = False
        if self.save_whole is not None:
            self.save_whole(run_dir / STAGING / name)
        save_neutral(self, run_dir / STAGING / name)  # every rank: sharded engines gather the state whole
        args = self.args  # type: ignore[attr-defined]
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # every rank wrote its RNG state
        staged = run_dir / STAGING / name
        # The first process publishes; then the first process of every other node, where its folder is
        # still staged (a node-local run folder). One at a time: on a shared folder a second node would
        # write the run card into a folder being renamed away.
        self._publish(staged, run_dir / name, args.process_index == 0)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        if args.world_size > 1:
            self._publish(staged, run_dir / name, args.process_index != 0 and args.local_process_index == 0)
            self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]

    def _publish(self, staged: Path, final: Path, mine: bool) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if not mine or not staged.is_dir():
            return
        for hook in getattr(self, "before_publish", []):
            hook(staged)
        publish(staged, final)
        try:
            staged.parent.rmdir()  # only when empty: a run folder without clutter
        except OSError:
            pass  # not empty: another checkpoint is being staged
        rotate_checkpoints(str(final.parent), save_total_limit=self.args.save_total_limit,  # type: ignore[attr-defined]
                           use_mtime=False)


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) ends training at the next optimizer step with
    a checkpoint. Later signals are ignored while it saves (torchrun forwards one more SIGINT to each
    worker, then kills them 30 s later). Under DDP the ranks agree on the step to stop at, or one rank
    would enter the checkpoint's collectives alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            print(f"\nunift: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
                  "then stopping", flush=True)
        self.received = signum

    def install(self) -> None:
        if self._previous:
            return
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a web UI's worker): leave signals alone
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: Any) -> bool:
        import torch
        import torch.distributed as dist

        asked = self.received is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(asked)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def callback(self):
        from transformers import TrainerCallback

        owner = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if not control.should_training_stop and owner.requested(args.device):
                    owner.stopped_at = state.global_step
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()


def clear_staging(output_dir: str | Path) -> None:
    """Remove what a kill left half-written (the main process, before training starts)."""
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)
