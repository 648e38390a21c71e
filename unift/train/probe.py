"""`unift train --plan`: the run's plan, printed instead of training it.

The plan runs the real run for a few optimizer steps (`--plan_steps`, 3 by default) with every setting of
the run (model, method, dtypes, engine, batch, levers), in a temporary folder that is removed afterwards,
on the run's longest examples: the probe's largest micro-batch is then the largest the run will meet, and
its measured peak memory is the run's. Its steps after the first (which builds the optimizer state and
meets every new shape) are timed; the time per step of the run is that, with the part outside the
optimizer step scaled from the probe's tokens per step to the run's mean, and the run's time is its first
step (as long as the probe's) and that time for every other step. Nothing is saved and nothing is
written outside the temporary folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from unift.errors import UniftError
from unift.runtime import is_main_process, peak_rss_mib
from unift.train.plan import Batches, Estimate, planned_batches, refusal, token_counts
from unift.train.prepared import PreparedRun

log = logging.getLogger("unift")


@dataclass
class Probe:
    """What --plan measures; train() calls attach() once the estimate is made, then trains the probe."""

    args: Any  # the run's own arguments (the probe trains with a copy: its steps, a temporary folder)
    steps: int
    started: float = field(default_factory=time.perf_counter)
    estimate: Estimate | None = None
    batches: Batches | None = None
    probe_batches: Batches | None = None
    train_begin: float | None = None
    step_ends: list[float] = field(default_factory=list)
    optimizer_seconds: list[float] = field(default_factory=list)
    peak_mib: float | None = None

    def attach(self, prepared: PreparedRun, found: Estimate, batches: Batches, padding_free: bool,
               multiple: int) -> PreparedRun | None:
        """Keep the estimate; the run to probe, on its longest examples (None: no steps to run)."""
        from unift.train.run import total_optimizer_steps

        self.estimate, self.batches = found, batches
        batches.steps = total_optimizer_steps(self.args, batches.examples)
        if self.steps == 0:
            return None
        train = prepared.train
        if hasattr(train, "select") and "input_ids" in getattr(train, "column_names", ()):
            per_step = (self.args.per_gpu_train_batch_size * self.args.gradient_accumulation_steps
                        * max(1, found.world_size))
            lengths = token_counts(train, "input_ids")
            longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:per_step * self.steps]
            prepared = dataclasses.replace(prepared, train=train.select(sorted(longest)))
            mine = [lengths[i] for i in longest]
        else:  # preference, grpo and streamed data: the probe takes the run's own batches
            mine = None
        self.probe_batches = (batches if mine is None else planned_batches(
            mine, self.args, padding_free=padding_free, multiple=multiple, steps=self.steps))
        return prepared

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            started_optimizer = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                probe.train_begin = time.perf_counter()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.started_optimizer = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kwargs):
                probe.optimizer_seconds.append(time.perf_counter() - self.started_optimizer)

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_ends.append(time.perf_counter())
                control.should_save = control.should_evaluate = False  # a probe keeps nothing

            def on_epoch_end(self, args, state, control, **kwargs):
                control.should_save = control.should_evaluate = False

        return Timer()

    def finish(self) -> None:
        import torch

        on_gpu = self.estimate is not None and self.estimate.device.startswith("cuda")
        self.peak_mib = torch.cuda.max_memory_reserved() / 2**20 if on_gpu else peak_rss_mib()

    def report(self) -> dict[str, Any]:
        """The plan: the estimate by part, the probe's measurements, the predicted peak and times."""
        found, run = self.estimate, self.batches
        assert found is not None and run is not None
        plan: dict[str, Any] = {"estimate": found.as_dict(), "run": dataclasses.asdict(run),
                                "predicted_peak_mib": found.peak_mib, "probe": None}
        if self.peak_mib is None:
            plan["setup_seconds"] = time.perf_counter() - self.started
            return plan
        probe = self.probe_batches or run
        peak = self.peak_mib
        if probe.largest < run.largest:  # the probe met a smaller micro-batch: add the difference's activations
            peak += found.activations_mib * (run.largest - probe.largest) / max(1, run.largest)
        # The first step builds the optimizer state and meets every new shape: warm-up, not timed.
        steps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:])]
        # the probe's first step, from the start of training: the Trainer's set-up, the optimizer state
        # built, every new shape met
        first = self.step_ends[0] - (self.train_begin or self.step_ends[0]) if self.step_ends else None
        optimizer = self.optimizer_seconds[1:]
        per_step = whole = None
        if steps:
            step = sum(steps) / len(steps)
            in_optimizer = min(step, sum(optimizer) / len(optimizer)) if optimizer else 0.0
            per_step = in_optimizer + (step - in_optimizer) * run.mean_step / max(1.0, probe.mean_step)
            whole = first + per_step * max(0, run.steps - 1)  # the run's first step as the probe's, then steady
        setup = (self.train_begin or time.perf_counter()) - self.started
        plan.update(predicted_peak_mib=peak, probe={
            "steps": len(self.step_ends), "timed_steps": len(steps), "peak_mib": self.peak_mib,
            "step_seconds": steps, "optimizer_seconds": optimizer, "tokens_per_step": probe.mean_step,
            "first_step_seconds": first,
            "largest_batch_tokens": probe.largest},
            seconds_per_step=per_step, train_seconds=whole, setup_seconds=setup)
        return plan


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def table(plan: dict[str, Any], args: Any) -> str:
    """The plan as a small table (what `--plan` prints)."""
    found, run, probe = plan["estimate"], plan["run"], plan["probe"]
    mib = "{:,.0f} MiB".format
    where = "GPU memory" if found["device"].startswith("cuda") else "RSS"
    rows = [
        ("run", f"{args.peft_type} on {found['device']}, {found['engine']} x {found['world_size']}, "
                f"{found['trainable']:,} of {found['parameters']:,} parameters train, optimizer {found['optimizer']}"),
        ("steps", f"{run['steps']:,} of {args.per_gpu_train_batch_size} x {args.gradient_accumulation_steps} "
                  f"examples per process ({run['examples']:,} examples); {run['mean_step']:,.0f} tokens per step, "
                  f"largest micro-batch {run['largest']:,} tokens"),
        ("held once loaded", f"{mib(found['held_mib'])} (weights {mib(found['weights_mib'])})"),
        ("gradients", mib(found["gradients_mib"])),
        ("optimizer state", mib(found["optimizer_mib"])),
    ]
    if found["engine_mib"]:
        rows.append((f"{found['engine']} buffers / shards", mib(found["engine_mib"])))
    rows += [(f"activations{' (checkpointed)' if found['gradient_checkpointing'] else ''}",
              mib(found["activations_mib"])),
             (f"estimated peak {where}", mib(found["peak_mib"]))]
    if probe:
        rows += [(f"probe: measured peak {where}", f"{mib(probe['peak_mib'])} after {probe['steps']} steps on the "
                                                   f"longest examples ({probe['largest_batch_tokens']:,} tokens)"),
                 (f"predicted peak {where} per process", mib(plan["predicted_peak_mib"]))]
    avail = found["available_mib"]
    rows.append(("available", "unknown" if avail is None else f"{mib(avail)} ({found['available_what']})"))
    if probe:
        per = plan.get("seconds_per_step")
        measured = ", ".join(f"{s:.2f}" for s in probe["step_seconds"]) or "none"
        rows += [("time per step", f"{per:.2f} s (probe steps: {measured} s)" if per is not None else
                  "? (no timed step: --plan_steps 2 or more)"),
                 ("training time", f"{clock(plan.get('train_seconds'))} for {run['steps']:,} steps, "
                                   f"after {clock(plan['setup_seconds'])} of set-up")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plan_run(args: Any) -> dict[str, Any]:
    """--plan: estimate and probe the run, print the plan (and --plan_json), refuse as a run would."""
    from unift.train.run import train

    probe = Probe(args=args, steps=args.plan_steps)
    with tempfile.TemporaryDirectory(prefix="unift-plan-") as folder:
        trial = dataclasses.replace(args, output_dir=folder, max_steps=max(1, args.plan_steps), plan=False,
                                    resume_from_checkpoint=None, report_to="none", save_steps=None)
        train(trial, callbacks=[probe.callback()], probe=probe)
    plan = probe.report()
    if is_main_process():
        print(table(plan, args))
        if args.plan_json:
            text = json.dumps(plan, indent=2, default=str)
            if args.plan_json == "-":
                print(text)
            else:
                with open(args.plan_json, "w", encoding="utf-8") as handle:
                    handle.write(text + "\n")
        sys.stdout.flush()
    found = probe.estimate
    assert found is not None
    line = refusal(plan["predicted_peak_mib"], found.available_mib, found.available_what,
                   measured=probe.peak_mib is not None)
    if line and not args.force:
        raise UniftError(line)
    return plan
