"""`unift train` with test instruments, run as a script (also under torchrun) by the DDP and kill tests.

    python tests/train_worker.py [--record DIR] [--pause_at STEP] [--pause_publish STEP] -- <train flags>

--record DIR      each rank writes DIR/rank<R>.pt: per optimizer step, the examples it trained on (their
                  label tokens) and its trainable parameters after the step.
--pause_at STEP   after optimizer step STEP, touch <output_dir>/paused (and paused-rank<R> with the process
                  id) and wait for <output_dir>/release.
--pause_publish STEP  the same, but inside the checkpoint of step STEP: written, not yet published.
A test uses the pauses to send SIGKILL or SIGINT at a known point; the run itself is the real one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from unift.cli import parse, setup_logging  # noqa: E402
from unift.errors import UniftError  # noqa: E402
from unift.options import parse_into  # noqa: E402
from unift.train.args import TrainArgs  # noqa: E402


def wait_for_release(folder: Path) -> None:
    # paused-rank<R> holds the process id, for a test that signals one rank of several
    rank = os.environ.get("RANK", "0")
    (folder / f".pid-{rank}").write_text(str(os.getpid()))
    os.replace(folder / f".pid-{rank}", folder / f"paused-rank{rank}")  # never seen half-written
    (folder / "paused").touch()
    deadline = time.monotonic() + 300  # never hang a test run for ever
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def examples_of(kwargs: dict) -> list[tuple[int, ...]]:
    """The label tokens of each example in a batch: rows of a padded batch, or the segments of a packed
    row (positions restart at 0 for each example)."""
    labels, positions = kwargs["labels"], kwargs.get("position_ids")
    found = []
    for r in range(labels.shape[0]):
        row = labels[r].tolist()
        if positions is None:
            bounds = [0, len(row)]
        else:
            pos = positions[r].tolist()
            bounds = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for start, end in zip(bounds, bounds[1:]):
            tokens = tuple(t for t in row[start:end] if t != -100)
            if tokens:
                found.append(tokens)
    return found


class Recorder(TrainerCallback):
    def __init__(self, folder: Path) -> None:
        self.folder, self.batch, self.steps = folder, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def see(_module, _args, kw):
            if torch.is_grad_enabled():  # training forwards only
                self.batch += examples_of(kw)

        model.register_forward_pre_hook(see, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        # FSDP2's parameters are DTensors: recorded whole (a collective, every rank records every step)
        params = torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().float().flatten()
                            for p in model.parameters() if p.requires_grad])
        self.steps.append({"step": state.global_step, "examples": self.batch, "params": params.clone()})
        self.batch = []

    def on_train_end(self, args, state, control, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.steps, self.folder / f"rank{os.environ.get('RANK', '0')}.pt")


class PauseAt(TrainerCallback):
    def __init__(self, step: int, folder: Path) -> None:
        self.step, self.folder = step, folder

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            wait_for_release(self.folder)


def main() -> int:
    own = argparse.ArgumentParser(allow_abbrev=False)
    own.add_argument("--record")
    own.add_argument("--pause_at", type=int)
    own.add_argument("--pause_publish", type=int)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else -1  # torchrun drops a leading "--"
    mine, flags = own.parse_args(argv[:max(split, 0)]), argv[split + 1:]
    setup_logging()
    try:
        args = parse_into(TrainArgs, parse(["train", *flags]))
    except UniftError as err:
        print(f"unift: error: {err}", file=sys.stderr)
        return 2
    callbacks: list = []
    if mine.record:
        callbacks.append(Recorder(Path(mine.record)))
    out = Path(args.output_dir)
    if mine.pause_at:
        callbacks.append(PauseAt(mine.pause_at, out))
    if mine.pause_publish:
        import unift.train.run

        build = unift.train.run.build_trainer

        def build_with_pause(*a, **kw):
            trainer = build(*a, **kw)
            step = mine.pause_publish

            def pause(folder: Path) -> None:
                if folder.name == f"checkpoint-{step}":
                    wait_for_release(out)

            trainer.before_publish.append(pause)
            return trainer

        unift.train.run.build_trainer = build_with_pause
    from unift.train.engines import leave_process_group
    from unift.train.run import train

    finished = False
    try:
        train(args, callbacks=callbacks)
        finished = True
    except UniftError as err:
        print(f"unift: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unift: interrupted", file=sys.stderr)
        return 130
    finally:
        # as `unift train` does: left to the interpreter's exit, gloo's threads can abort a finished rank
        leave_process_group(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
