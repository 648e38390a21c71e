"""DDP proven on CPU: `torchrun --nproc_per_node 2` (gloo, one thread each) trains exactly as one process
with the same global batch and seed. Each rank sees different examples, together the one-process run's;
the ranks hold identical parameters after every step; losses and adapter equal the one-process run's.

Tolerance (fp32): losses 1e-5 relative; parameters: 999 in 1000 within 1e-6 and all within 1e-4 (1% of
the learning rate). The sum over ranks rounds differently from one process's sum, and where a gradient is
as small as Adam's epsilon (1e-8) that rounding becomes a visible part of the step: measured, one of 16,384
parameters 6.5e-5 apart, the rest within 1.5e-6. In bf16 the two runs part by about the learning rate on some parameters after two steps, with or without
--optimizations: rounding differs with the batch shape, and Adam's first steps move every coordinate by
about lr whatever the sign of a near-zero gradient, so the test trains in fp32. Dropout is off: each
process draws its own masks, so dropout can never match a one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import memorisation_rows
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "train_worker.py"


def varied_rows(n: int) -> list[dict]:
    # Answers of different lengths: a rank-local mean loss would weigh tokens differently from one process
    # (the Trainer must average over the tokens of all ranks for the runs to agree).
    return [{**row, "output": " ".join([row["output"]] * (1 + i % 5))} for i, row in enumerate(memorisation_rows(n))]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= 1e-4, f"{what}: {diff.max():.2e} apart"
    assert (diff > 1e-6).float().mean() <= 1e-3, f"{what}: {(diff > 1e-6).sum()} of {diff.numel()} beyond 1e-6"


def test_two_ranks_train_as_one_process(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl(varied_rows(16))
    flags = ["--model_type", "qwen2", "--model_name_or_path", str(tiny_model("qwen2")), "--data", str(data),
             "--max_steps", "6", "--learning_rate", "1e-2", "--logging_steps", "1", "--compute_dtype", "fp32",
             "--lora_dropout", "0", "--save_steps", "3"]  # default --optimizations: all
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(WORKER), "--record", str(tmp_path / "rec-ddp"), "--", *flags,
               "--output_dir", str(tmp_path / "ddp"), "--per_gpu_train_batch_size", "2"], tmp_path)
    run([sys.executable, str(WORKER), "--record", str(tmp_path / "rec-one"), "--", *flags,
         "--output_dir", str(tmp_path / "one"), "--per_gpu_train_batch_size", "4"], tmp_path)

    # The batch flags are per device; the global batch is stated once.
    assert ddp.stderr.count("batch 2 per device x 1 accumulation x 2 processes = 4 examples per step (ddp)") == 1
    rank0, rank1 = (torch.load(tmp_path / "rec-ddp" / f"rank{r}.pt") for r in (0, 1))
    one = torch.load(tmp_path / "rec-one" / "rank0.pt")
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == [s["step"] for s in one] == list(range(1, 7))
    for a, b, single in zip(rank0, rank1, one):
        assert len(a["examples"]) == len(b["examples"]) == 2
        assert not set(a["examples"]) & set(b["examples"]), f"step {a['step']}: both ranks saw an example"
        assert sorted(a["examples"] + b["examples"]) == sorted(single["examples"]), f"step {a['step']}"
        assert torch.equal(a["params"], b["params"]), f"step {a['step']}: ranks diverged"
        assert_same_weights(a["params"], single["params"], f"step {a['step']}")
    assert not torch.equal(one[0]["params"], one[-1]["params"])  # it trained

    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "one")}
    assert metrics["ddp"]["world_size"] == 2 and metrics["ddp"]["global_steps"] == 6
    curves = [[p["loss"] for p in metrics[name]["loss_curve"]] for name in ("ddp", "one")]
    assert len(curves[0]) == 6
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-5, atol=0)
    adapters = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("ddp", "one")]
    assert adapters[0].keys() == adapters[1].keys()
    flat = [torch.cat([adapter[key].float().flatten() for key in sorted(adapter)]) for adapter in adapters]
    assert_same_weights(flat[0], flat[1], "the saved adapters")
