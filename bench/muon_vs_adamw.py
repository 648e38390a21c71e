"""--optim muon against adamw_torch at the same learning rate: LoRA on the embedded SmolLM2-135M, --data arith,
the same steps, batch and schedule, one process per run, over several seeds (each a round: the seed sets the
LoRA initialisation and the data order, the same for both optimizers within a round).

    nice -n 10 python bench/muon_vs_adamw.py [--steps 20] [--seeds 1,2,3] [--lr 3e-4] [--optims muon]

Per run: the loss at step N, the mean loss over the last 5 steps, and the median step time (steps 2..N). The
table goes to stdout as markdown, every round shown (docs/full_and_freeze.md)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIMS = ("adamw_torch", "muon")


def one(optim: str, seed: int, steps: int, batch: int, lr: float, out: Path) -> dict:
    """Train with `optim` in this process; its losses and step times."""
    from transformers import TrainerCallback

    from unift.train.args import TrainArgs
    from unift.train.run import train

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    clock = Clock()
    args = TrainArgs(peft_type="lora", optim=optim, data=["arith"], max_steps=steps, per_gpu_train_batch_size=batch,
                     learning_rate=lr, seed=seed, logging_steps=1, save_steps=100000, output_dir=str(out),
                     report_to="none")
    result = train(args, callbacks=[clock])
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    return {"optim": optim, "seed": seed, "loss_last": losses[-1], "loss_last5": statistics.fmean(losses[-5:]),
            "step_s": statistics.median(clock.times[1:]), "compute_dtype": result.metrics["compute_dtype"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--optims", default=",".join(OPTIMS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: optim,seed -> train, print JSON
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        optim, seed = opts.one.split(",")
        found = one(optim, int(seed), opts.steps, opts.batch, opts.lr, Path(opts.out))
        print("RESULT " + json.dumps(found), flush=True)
        return
    sys.path.insert(0, str(REPO / "bench"))
    from common import child_result, machine

    rows = []
    with tempfile.TemporaryDirectory(prefix="unift-muon-") as folder:
        for seed in opts.seeds.split(","):
            for optim in opts.optims.split(","):
                print(f"{optim}, seed {seed} ...", file=sys.stderr, flush=True)
                rows.append(child_result(__file__, ["--one", f"{optim},{seed}", "--out", f"{folder}/{optim}-{seed}",
                                                    "--steps", str(opts.steps), "--batch", str(opts.batch),
                                                    "--lr", str(opts.lr)], f"{optim}, seed {seed}"))
                print("  " + json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"LoRA on the embedded SmolLM2-135M, --data arith, {opts.steps} steps of {opts.batch} examples, lr "
          f"{opts.lr:g} (cosine, unift's defaults otherwise), compute {rows[0]['compute_dtype']}; {machine()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| seed | --optim | loss at step N | mean loss, last 5 | step s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['optim']} | {r['loss_last']:.3f} | {r['loss_last5']:.3f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
