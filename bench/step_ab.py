"""Same-batch A/B of unift's speed-ups: what each one is worth, to a few per cent.

Whole runs on a shared 2-core machine move by 20% from one minute to the next, which hides any lever worth
less than that. Here one training run does the comparison: before each real step, that step's batch goes
through one forward and backward pass under every variant in turn (the order alternating from batch to
batch), each pass timed; gradients are then cleared and the real step runs with unift's defaults. Every
variant sees the same batches at nearly the same moment, so the paired ratios are steady.

A variant is a set of optimizations (`--optimizations` names); `all-X` means all but X. The base's dtype
and storage and the batch layout are fixed when the run starts, so `base_dtype`, `bf16_storage` and
`padding_free` cannot be switched here (bench/train_throughput.py --levers measures them in whole runs).

    python bench/step_ab.py --data FILE.json [--examples 64] [--epochs 2] [--variants all all-fused_lora ...]

Default: `all` against all but each switchable lever, on the standard workload (bench/train_throughput.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, standard_train_args, write_workload  # noqa: E402

SWITCHABLE = ("fused_lora", "fast_dropout", "lean_layers", "cpu_attention", "label_loss")
FIXED = ("base_dtype", "bf16_storage", "padding_free")  # chosen at load time: kept in every variant


def wanted(variant: str) -> tuple[str, ...]:
    from unift.accel import OPTIMIZATIONS, parse_optimizations
    from unift.errors import UniftError

    if variant.startswith("all-"):
        left_out = set(variant[4:].split("-"))
        unknown = left_out - set(SWITCHABLE)
        if unknown:
            raise SystemExit(f"--variants {variant}: can leave out only {', '.join(SWITCHABLE)}, "
                             f"not {', '.join(sorted(unknown))}")
        names = [n for n in OPTIMIZATIONS if n not in left_out]
    else:
        try:
            names = list(parse_optimizations(variant))
        except UniftError as err:
            raise SystemExit(f"--variants {variant}: {err}") from None
    return tuple(n for n in OPTIMIZATIONS if n in names or n in FIXED)


class Switcher:
    """Wraps unift.train's prepare_training: keeps what it needs to re-apply another set of optimizations
    to the same model, in place, and puts the run's own set back before each real step."""

    def __init__(self, variants: list[str]) -> None:
        self.variants = variants
        self.sets = {v: wanted(v) for v in variants}  # a misspelt name fails here, before the model loads
        self.times: dict[str, list[float]] = {v: [] for v in variants}
        self.batches = 0

    def install(self) -> None:
        import transformers

        import unift.train.run as train_module

        prepare = train_module.prepare_training

        def wrapped(model, spec, method, optimizations, **kwargs):
            self.held = prepare(model, spec, method, optimizations, **kwargs)
            self.apply = lambda names: prepare(model, spec, method, names, **kwargs)
            self.default = optimizations
            return self.held

        train_module.prepare_training = wrapped
        step = transformers.Trainer.training_step
        switcher = self

        def training_step(trainer, model, inputs, *args, **kwargs):
            switcher.measure(trainer, model, inputs)
            return step(trainer, model, inputs, *args, **kwargs)

        transformers.Trainer.training_step = training_step

    def use(self, names: tuple[str, ...]) -> None:
        self.held.restore()
        fresh = self.apply(names)
        self.held.undo, self.held.applied, self.held.skipped = fresh.undo, fresh.applied, fresh.skipped

    def measure(self, trainer, model, inputs) -> None:
        order = self.variants if self.batches % 2 == 0 else self.variants[::-1]
        self.batches += 1
        for variant in order:
            self.use(self.sets[variant])
            started = time.perf_counter()
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            self.times[variant].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        self.use(self.default)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="alpaca-format JSON/JSONL file")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the examples (more pairs, steadier)")
    parser.add_argument("--variants", nargs="+", default=["all", *(f"all-{n}" for n in SWITCHABLE)])
    ns = parser.parse_args()
    if not ns.data.is_file():
        parser.error(f"--data {ns.data}: no such file")
    switcher = Switcher(ns.variants)
    from unift.options import add_arguments, parse_into
    from unift.train.args import TrainArgs
    from unift.train.run import train

    switcher.install()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_workload(ns.data, ns.examples, Path(tmp))
        flags = standard_train_args(data, Path(tmp) / "run", ns.epochs)
        parser_ = argparse.ArgumentParser()
        add_arguments(parser_, TrainArgs)
        train(parse_into(TrainArgs, parser_.parse_args(flags)))
    first = ns.variants[0]
    skip = 2  # the first batches also pay for oneDNN's kernel compilation
    print(f"\nsame-batch A/B: standard workload, first {ns.examples} records of {ns.data.name}, "
          f"{switcher.batches - skip} batches x {len(ns.variants)} variants; {machine()}; {date.today()}\n")
    print(f"{'variant':<28} {'s/pass':>7} {'time vs ' + first:>14}   quartiles of the per-batch ratio")
    for variant, times in switcher.times.items():
        times = times[skip:]
        ratios = [t / b for t, b in zip(times, switcher.times[first][skip:])]
        low, mid, high = quartiles(ratios)
        print(f"{variant:<28} {statistics.mean(times):>7.3f} {mid:>13.3f}x   {low:.3f} - {high:.3f}")


if __name__ == "__main__":
    main()
