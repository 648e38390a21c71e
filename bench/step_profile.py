"""Profiles a few training steps of any transformers Trainer run, in that run's own process and virtual
environment (it needs only torch and transformers, so LLaMA-Factory's venv runs it as well as unift's).

    PYTHON bench/step_profile.py --out BUDGET.json [--warmup 2] [--steps 3] -- SCRIPT [ARGS...]

SCRIPT runs as `python SCRIPT ARGS` would (unift's uniform_finetune.py, LLaMA-Factory's llamafactory-cli).
Every Trainer built in it gets a callback that lets `--warmup` optimizer steps pass (oneDNN compiles its
kernels for every new shape in the first ones), times `--steps` steps without the profiler, then profiles
as many with torch.profiler (CPU activities), stops the training, and writes the budget (bench/budget.py
reads the profile into buckets). A step runs from one step's end to the next: fetching and collating the
batch, forward, backward, gradient clipping, the optimizer, the scheduler.
"""

from __future__ import annotations

import argparse
import functools
import json
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import DATA_RANGE, OPTIMIZER_RANGE, budget  # noqa: E402


def _ranged(function, name: str):
    """`function` inside a profiler range called `name` (its whole time goes to that range's bucket)."""
    import torch

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with torch.autograd.profiler.record_function(name):
            return function(*args, **kwargs)

    return wrapped


def install(out: Path, warmup: int, steps: int) -> None:
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    # The batch fetch (the DataLoader, the collator, accelerate's move to the device, the label count) and
    # the gradient clipping are Python around ops: ranges make their whole time theirs. The optimizer
    # marks its own step (Optimizer.step#...).
    transformers.Trainer.get_batch_samples = _ranged(transformers.Trainer.get_batch_samples, DATA_RANGE)
    torch.nn.utils.clip_grad_norm_ = _ranged(torch.nn.utils.clip_grad_norm_, OPTIMIZER_RANGE)

    class Budget(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.done = 0
            self.marks: list[float] = []
            self.profiler = None

        def on_step_end(self, args, state, control, **kwargs):
            self.done += 1
            now = time.perf_counter()
            if self.done >= warmup:
                self.marks.append(now)
            if self.done == warmup + steps:  # the unprofiled steps are timed: now profile as many
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.start()
                self.marks.append(time.perf_counter())  # the profiler's start is no step's time
            elif self.done == warmup + 2 * steps:
                self.profiler.stop()
                plain = [b - a for a, b in zip(self.marks[:steps], self.marks[1:steps + 1])]
                profiled = self.marks[-1] - self.marks[steps + 1]
                result = budget(self.profiler.events(), profiled, steps)
                result["plain_step_seconds"] = plain
                result["torch"] = torch.__version__
                result["threads"] = torch.get_num_threads()
                out.write_text(json.dumps(result, indent=1))
                control.should_training_stop = True
            return control

    init = transformers.Trainer.__init__

    @functools.wraps(init)
    def with_budget(trainer, *args, **kwargs):
        init(trainer, *args, **kwargs)
        trainer.add_callback(Budget())

    transformers.Trainer.__init__ = with_budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    if ns.warmup < 1 or ns.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    install(ns.out, ns.warmup, ns.steps)
    sys.argv = [ns.script, *ns.args]
    runpy.run_path(ns.script, run_name="__main__")


if __name__ == "__main__":
    main()
