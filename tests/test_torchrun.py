"""DDP proven on CPU: `torchrun --nproc_per_node 2` (gloo, one thread each) trains exactly as one process
with the same global batch and seed. Each rank sees different examples, together the one-process run's;
the ranks hold identical parameters after every step; losses and adapter equal the one-process run's.

Tolerance (fp32): losses 1e-5 relative; parameters: 99 in 100 within 1e-6, 999 in 1000 within 1e-5 and all
within 1e-3 (10% of the learning rate). The sum over ranks rounds differently from one process's sum, and where a gradient is
as small as Adam's epsilon (1e-8) that rounding becomes a visible part of the step (Adam moves such a
coordinate by up to about lr whatever its size): measured, one of 16,384 parameters 6.5e-5 apart; after a
change that only reordered fp32 sums in the fused LoRA layer, two 2.3e-4 apart, and by step 5 their effect
on the other parameters put 25 of 16,384 beyond 1e-6 (none other beyond 1e-5). A real fault (a rank's
gradient missing, or counted twice) moves most parameters by about the learning rate. In bf16 the two runs part by about the learning rate on some parameters after two steps, with or without
--optimizations: rounding differs with the batch shape, and Adam's first steps move every coordinate by
about lr whatever the sign of a near-zero gradient, so the test trains in fp32. Dropout is off: each
process draws its own masks, so dropout can never match a one-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from after_training_helpers import free_port
from conftest import memorisation_rows
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "train_worker.py"


def varied_rows(n: int) -> list[dict]:
    # Answers of different lengths: a rank-local mean loss would weigh tokens differently from one process
    # (the Trainer must average over the tokens of all ranks for the runs to agree).
    return [{**row, "output": " ".join([row["output"]] * (1 + i % 5))} for i, row in enumerate(memorisation_rows(n))]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= 1e-3, f"{what}: {diff.max():.2e} apart"
    for bound, share in ((1e-6, 1e-2), (1e-5, 1e-3)):
        assert (diff > bound).float().mean() <= share, f"{what}: {(diff > bound).sum()} of {diff.numel()} beyond {bound}"


def torchrun(worker_args: list[str], cwd: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(WORKER), *worker_args]


def equality_flags(model: Path, tmp_path: Path, steps: int, save_steps: int) -> list[str]:
    """The flags of every 'N processes equal one' run: the tiny qwen2, fp32, no dropout, 16 varied rows
    written into tmp_path (default --optimizations: all)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(16)), encoding="utf-8")
    return ["--model_type", "qwen2", "--model_name_or_path", str(model), "--data", str(data),
            "--max_steps", str(steps), "--learning_rate", "1e-2", "--logging_steps", "1", "--compute_dtype", "fp32",
            "--lora_dropout", "0", "--save_steps", str(save_steps)]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same 6 steps as two ranks of batch 2 and as one process of batch 4, each step recorded."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    flags = equality_flags(tiny_model("qwen2"), tmp_path, steps=6, save_steps=3)
    ddp = run(torchrun(["--record", str(tmp_path / "rec-ddp"), "--", *flags, "--output_dir", str(tmp_path / "ddp"),
                        "--per_gpu_train_batch_size", "2"], tmp_path, free_port()), tmp_path)
    run([sys.executable, str(WORKER), "--record", str(tmp_path / "rec-one"), "--", *flags,
         "--output_dir", str(tmp_path / "one"), "--per_gpu_train_batch_size", "4"], tmp_path)
    return tmp_path, flags, ddp.stderr


def test_two_ranks_train_as_one_process(runs):
    tmp_path, _, stderr = runs
    # The batch flags are per device; the global batch is stated once.
    assert stderr.count("batch 2 per device x 1 accumulation x 2 processes = 4 examples per step (ddp)") == 1
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


def test_ctrl_c_on_one_rank_stops_both_at_one_step_with_a_checkpoint_that_resumes(runs):
    """SIGINT reaches one rank only (the other would otherwise wait in its next all-reduce for ever): both
    stop after the same step, the checkpoint holds both ranks' RNG states, and a resume under torchrun
    ends where the uninterrupted two-rank run ended."""
    tmp_path, flags, _ = runs
    out = tmp_path / "ctrl-c"
    mine = [*flags, "--output_dir", str(out), "--per_gpu_train_batch_size", "2", "--save_steps", "4"]
    proc = subprocess.Popen(torchrun(["--pause_at", "2", "--", *mine], tmp_path, free_port()), cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not all((out / f"paused-rank{r}").exists() for r in (0, 1)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the ranks never reached their pause"
        time.sleep(0.05)
    os.kill(int((out / "paused-rank1").read_text()), signal.SIGINT)
    time.sleep(0.2)
    (out / "release").touch()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # the workers exit with 130, torchrun reports their failure
    assert "stopped at step 3 of 6" in stderr, stderr[-3000:]
    saved = out / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= \
        {p.name for p in saved.iterdir()}
    assert not (out / "adapter_model.safetensors").exists()

    run(torchrun(["--", *mine, "--resume_from_checkpoint"], tmp_path, free_port()), tmp_path)
    got, expected = (json.loads((folder / "metrics.json").read_text())["loss_curve"]
                     for folder in (out, tmp_path / "ddp"))
    assert [p["step"] for p in got] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([p["loss"] for p in got]), torch.tensor([p["loss"] for p in expected]),
                               rtol=1e-6, atol=0)
    adapters = [load_file(folder / "adapter_model.safetensors") for folder in (out, tmp_path / "ddp")]
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=0, atol=1e-6)
