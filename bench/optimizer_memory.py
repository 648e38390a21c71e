"""What the optimizers that save memory save: full tuning (--peft_type full) of the embedded SmolLM2-135M with
each optimizer, in its own process, one after the other, on the same data (--data arith), seed, batch,
learning rate and number of steps.

    nice -n 10 python bench/optimizer_memory.py [--steps 20] [--batch 4] [--optims adamw_torch,galore_adamw,...]
        [--model embedded|scale]

--model scale trains a randomly initialised decoder of SmolLM2-360M's shape (bench/fair.py, stored once in
bf16 under the bench cache) with the embedded model's tokenizer instead: the memory columns at that size
(random weights change what the loss does, not what the optimizer holds).

Per optimizer, measured inside its process (a TrainerCallback):
- peak RSS: the process's high-water mark (loading included), and the RSS when training starts (weights
  loaded, nothing of the optimizer yet);
- optimizer state: every tensor the optimizer holds at the end of each step, the largest over the run
  (AdamW's two moments; GaLore's and APOLLO's low-rank moments and projection matrices; layerwise: the
  per-parameter optimizers together; BAdam: the active block's moments and its fp32 copy of that block);
- gradients: the gradient tensors held at the optimizer step (layerwise optimizers step and free each
  gradient inside the backward pass, so none is left);
- step time: the median over steps 2..N (step 1 builds the state; GaLore's first SVD falls there);
- loss: at step N, and the mean over the last 5 steps.
Defaults everywhere else (GaLore/APOLLO rank 128, projection renewed every 200 steps; BAdam one decoder layer
at a time, 50 steps each, the last layer first). The table goes to stdout as markdown, beside the adamw_torch
baseline (docs/full_and_freeze.md)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIMS = ("adamw_torch", "adamw_8bit", "galore_adamw", "galore_adamw_layerwise", "apollo_adamw", "badam", "muon")
MIB = 2**20


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    # GaLore's and APOLLO's projectors keep their matrices as attributes
    return sum(_tensor_bytes(v) for v in getattr(value, "__dict__", {}).values())


def optimizer_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if hasattr(inner, "optimizer_dict"):  # transformers' layerwise dummy: one optimizer per parameter
        return sum(optimizer_bytes(o) for o in set(inner.optimizer_dict.values()))
    if hasattr(inner, "base_optimizer"):  # BAdam: AdamW over the active block, plus its fp32 copy of it
        return optimizer_bytes(inner.base_optimizer) + _tensor_bytes(list(inner.param_idx2hp.values()))
    return sum(_tensor_bytes(state) for state in inner.state.values())


def model_flags(model: str) -> dict:
    """The TrainArgs that pick the model: the embedded one, or the random 360M-shaped decoder."""
    if model == "embedded":
        return {}
    sys.path.insert(0, str(REPO / "bench"))
    from fair import scale_checkpoint

    from unift.models import embedded_model_dir

    return {"model_type": "llama", "model_name_or_path": str(scale_checkpoint(embedded_model_dir()))}


def one(optim: str, steps: int, batch: int, out: Path, model: str = "embedded") -> dict:
    """Train with `optim` in this process; what the callback measured."""
    from transformers import TrainerCallback

    from unift.runtime import peak_rss_mib, rss_mib
    from unift.train.args import TrainArgs
    from unift.train.run import train

    class Measure(TrainerCallback):
        def __init__(self) -> None:
            self.start_rss = 0.0
            self.state_bytes = 0
            self.grad_bytes = 0
            self.times: list[float] = []
            self.began = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_rss = rss_mib() or float("nan")

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            self.grad_bytes = max(self.grad_bytes, held)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.times.append(time.perf_counter() - self.began)
            self.state_bytes = max(self.state_bytes, optimizer_bytes(optimizer))

    measure = Measure()
    args = TrainArgs(peft_type="full", optim=optim, data=["arith"], max_steps=steps, per_gpu_train_batch_size=batch,
                     learning_rate=1e-4, logging_steps=1, save_steps=100000, output_dir=str(out), report_to="none",
                     **model_flags(model))
    result = train(args, callbacks=[measure])
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    return {"optim": optim, "peak_rss_mib": peak_rss_mib(), "start_rss_mib": measure.start_rss,
            "state_mib": measure.state_bytes / MIB, "grad_mib": measure.grad_bytes / MIB,
            "step_s": statistics.median(measure.times[1:] or measure.times), "loss_last": losses[-1],
            "loss_last5": statistics.fmean(losses[-5:]), "compute_dtype": result.metrics["compute_dtype"],
            "parameters": result.metrics["total_parameters"]}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["optim"] == "adamw_torch"), rows[0])

    def rel(row: dict, key: str) -> str:
        return f"{row[key]:,.0f} ({row[key] / base[key]:.2f}x)" if base[key] else f"{row[key]:,.0f}"

    lines = ["| --optim | peak RSS MiB | RSS at start MiB | optimizer state MiB | gradients MiB | step s | "
             "loss at step N | mean loss, last 5 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optim']} | {rel(r, 'peak_rss_mib')} | {r['start_rss_mib']:,.0f} | "
                     f"{rel(r, 'state_mib')} | {rel(r, 'grad_mib')} | {r['step_s']:.2f} "
                     f"({r['step_s'] / base['step_s']:.2f}x) | {r['loss_last']:.3f} | {r['loss_last5']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--optims", default=",".join(OPTIMS))
    parser.add_argument("--model", choices=("embedded", "scale"), default="embedded")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: train with this optimizer, print JSON
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        print("RESULT " + json.dumps(one(opts.one, opts.steps, opts.batch, Path(opts.out), opts.model)), flush=True)
        return
    sys.path.insert(0, str(REPO / "bench"))
    from common import child_result, machine

    rows = []
    with tempfile.TemporaryDirectory(prefix="unift-optim-mem-") as folder:
        for i, optim in enumerate(opts.optims.split(",")):
            print(f"{optim} ...", file=sys.stderr, flush=True)
            rows.append(child_result(__file__, ["--one", optim, "--out", f"{folder}/run{i}", "--steps", str(opts.steps),
                                                "--batch", str(opts.batch), "--model", opts.model], optim))
            print("  " + json.dumps(rows[-1]), file=sys.stderr, flush=True)
    first = rows[0]
    what = "the embedded SmolLM2-135M" if opts.model == "embedded" else "a random SmolLM2-360M-shaped decoder"
    print(f"Full tuning of {what} ({first['parameters']:,} parameters), --data arith, "
          f"{opts.steps} steps of {opts.batch} examples, lr 1e-4, compute {first['compute_dtype']}; {machine()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
