"""Resume anywhere: a checkpoint written by 2 processes under DDP, FSDP, ZeRO-2 or ZeRO-3 continues on 1
process, and a 1-process checkpoint continues on 2 processes under each of them, to the adapter of the
uninterrupted run. The global batch stays the checkpoint's (4 examples per step), the accumulation adjusts to
the new world size and per-device batch, and every step trains on the same examples as the uninterrupted run.

One chain per engine keeps it to one 2-process launch each: the 1-process reference run (batch 2 x 2
accumulation, a checkpoint every step) -> its checkpoint-1 resumed on 2 processes under the engine (batch 2,
the accumulation becomes 1) -> that run's checkpoint-2, written by the 2 processes, resumed on 1 process
(batch 1, the accumulation becomes 4). Tolerances are tests/test_torchrun.py's (fp32, dropout 0): losses 1e-5
relative; parameters 99 in 100 within 1e-6, 999 in 1000 within 1e-5, all within 1e-3 (a tenth of the
learning rate). Other batch shapes and engines sum the gradient in another order, which moves fp32 results by
rounding only; a resume that lost the optimizer's moments, the schedule or the data position moves most
parameters by about the learning rate."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from after_training_helpers import cli_result, free_port
from test_engines import adapter, launch, losses
from test_torchrun import WORKER, assert_same_weights, equality_flags, run
from train_worker import Recorder

ENGINES = ("ddp", "fsdp", "zero2", "zero3")
STEPS = 4


def train_here(flags: list[str], record: Path | None = None) -> None:
    from unift.cli import parse
    from unift.options import parse_into
    from unift.train.args import TrainArgs
    from unift.train.run import train

    train(parse_into(TrainArgs, parse(["train", *flags])), callbacks=[Recorder(record)] if record else None)


def examples(record: Path) -> dict[int, list]:
    """Step -> the examples trained in it, over every rank that recorded."""
    steps: dict[int, list] = {}
    for file in sorted(record.glob("rank*.pt")):
        for step in torch.load(file):
            steps.setdefault(step["step"], []).extend(step["examples"])
    return {step: sorted(seen) for step, seen in steps.items()}


def card(folder: Path) -> dict:
    return json.loads((folder / "unift_run.json").read_text())["scaling"]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory, one_torch_thread):
    tmp_path = tmp_path_factory.mktemp("resume-anywhere")
    flags = [*equality_flags(tiny_model("qwen2"), tmp_path, steps=STEPS, save_steps=1),
             "--gradient_accumulation_steps", "2", "--save_total_limit", "10"]
    train_here([*flags, "--output_dir", str(tmp_path / "one"), "--per_gpu_train_batch_size", "2"], tmp_path / "rec-one")
    return tmp_path, flags


@pytest.fixture(scope="module")
def two_processes(reference):
    """engine -> the run folder of reference/checkpoint-1 continued on 2 processes under that engine."""
    tmp_path, flags = reference
    done: dict[str, tuple[Path, str]] = {}

    def get(engine: str) -> tuple[Path, str]:
        if engine not in done:
            out = tmp_path / engine
            mine = ["--record", str(tmp_path / f"rec-{engine}"), "--", *flags, "--output_dir", str(out),
                    "--per_gpu_train_batch_size", "2", "--resume_from_checkpoint", str(tmp_path / "one" / "checkpoint-1")]
            if engine == "ddp":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), str(WORKER), *mine]
            else:
                cmd = launch(engine, WORKER, mine)
            done[engine] = (out, run(cmd, tmp_path).stderr)
        return done[engine]

    return get


def assert_continues_the_reference(out: Path, one: Path, first: int, what: str) -> None:
    """Losses of every step, the checkpoints the resumed run wrote and its final adapter, against the run
    that was never interrupted."""
    got = json.loads((out / "metrics.json").read_text())["loss_curve"]
    assert [p["step"] for p in got] == list(range(1, STEPS + 1)), what  # the history before the resume is kept
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one)), rtol=1e-5, atol=0)
    for step in range(first, STEPS + 1):
        assert_same_weights(adapter(out / f"checkpoint-{step}"), adapter(one / f"checkpoint-{step}"),
                            f"{what}: checkpoint-{step}")
    assert_same_weights(adapter(out), adapter(one), f"{what}: final adapter")
    assert not torch.equal(adapter(out), adapter(one / f"checkpoint-{first - 1}"))  # it trained on


@pytest.mark.parametrize("engine", ENGINES)
def test_one_process_checkpoint_continues_on_two_processes(engine, reference, two_processes):
    tmp_path, _ = reference
    out, stderr = two_processes(engine)
    one = tmp_path / "one"
    # The flags said 2 per device x 2 accumulation; on 2 processes the checkpoint's 4 examples per step need 1.
    assert "--gradient_accumulation_steps 1, not 2, keeps it" in stderr
    assert "batch 2 per device x 1 accumulation x 2 processes = 4 examples per step" in stderr
    assert "from its engine-neutral state" in stderr
    assert_continues_the_reference(out, one, 2, f"1 -> 2 ({engine})")
    want = examples(tmp_path / "rec-one")
    assert examples(tmp_path / f"rec-{engine}") == {step: want[step] for step in range(2, STEPS + 1)}
    scaling = card(out)
    assert scaling["engine"] == ("deepspeed" if engine.startswith("zero") else engine)
    assert scaling["world_size"] == 2 and scaling["global_batch"] == 4
    assert scaling.get("zero_stage") == ({"zero2": 2, "zero3": 3}.get(engine))
    assert scaling["resumed_from"]["engine"] == "single" and scaling["resumed_from"]["world_size"] == 1
    assert scaling["resumed_from"]["loaded"] == "engine-neutral state"
    # Every checkpoint says what wrote it: the engine as it ran, 2 processes, the same global batch.
    written = json.loads((out / "checkpoint-2" / "unift_resume.json").read_text())
    assert (written["engine"], written["world_size"], written["global_batch"]) == (
        "ddp" if engine == "ddp" else engine, 2, 4)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_process_checkpoint_continues_on_one_process(engine, reference, two_processes):
    tmp_path, flags = reference
    two, _ = two_processes(engine)
    out = tmp_path / f"{engine}-to-one"
    # 1 per device: the accumulation becomes 4 (the flags say 2)
    train_here([*flags, "--output_dir", str(out), "--per_gpu_train_batch_size", "1", "--resume_from_checkpoint",
                str(two / "checkpoint-2")], tmp_path / f"rec-{engine}-to-one")
    assert_continues_the_reference(out, tmp_path / "one", 3, f"2 -> 1 ({engine})")
    want = examples(tmp_path / "rec-one")
    assert examples(tmp_path / f"rec-{engine}-to-one") == {step: want[step] for step in range(3, STEPS + 1)}
    scaling = card(out)
    assert (scaling["engine"], scaling["world_size"], scaling["gradient_accumulation_steps"]) == ("single", 1, 4)
    assert scaling["resumed_from"]["world_size"] == 2 and scaling["resumed_from"]["global_batch"] == 4


# ---- what cannot be resumed: one line, nothing trained -----------------------------------------------

def refused(capsys, flags: list[str], out: Path) -> str:
    code, _, err = cli_result(["train", *flags, "--output_dir", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("unift: error")]
    assert code != 0 and len(lines) == 1, err
    assert not (out / "adapter_model.safetensors").exists()
    return lines[0]


def test_a_checkpoint_of_another_method_rank_or_batch_is_refused_in_one_line(reference, two_processes, capsys):
    tmp_path, flags = reference
    checkpoint = str(tmp_path / "one" / "checkpoint-2")
    line = refused(capsys, [*flags, "--peft_type", "dora", "--resume_from_checkpoint", checkpoint], tmp_path / "x1")
    assert "trained with --peft_type lora, this run asks for --peft_type dora" in line and checkpoint in line
    line = refused(capsys, [*flags, "--lora_r", "3", "--resume_from_checkpoint", checkpoint], tmp_path / "x2")
    assert re.search(r"lora_A\.default\.weight is 8x\d+ there and 3x\d+ here", line), line
    line = refused(capsys, [*flags, "--per_gpu_train_batch_size", "3", "--resume_from_checkpoint", checkpoint],
                   tmp_path / "x3")
    assert "its global batch is 4 examples per step" in line, line
    # A 2-process checkpoint from before the engine-neutral state (none beside the engine's own) on 1 process
    two, _ = two_processes("zero3")
    old = tmp_path / "old-checkpoint"
    shutil.copytree(two / "checkpoint-2", old)
    for name in ("unift_resume.json", "unift_resume.pt"):
        (old / name).unlink()
    line = refused(capsys, [*flags, "--per_gpu_train_batch_size", "2", "--resume_from_checkpoint", str(old)],
                   tmp_path / "x4")
    assert "written by 2 processes before unift kept an engine-neutral state; resume it on 2 processes" in line


def test_the_run_card_records_the_engine_that_ran_not_the_environment(reference, monkeypatch):
    """accelerate's FSDP variable set for one CPU process: unift does not shard one process, and the card
    says so (it used to copy the variable)."""
    tmp_path, flags = reference
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "one-process-fsdp-env"
    mine = [*flags, "--output_dir", str(out), "--per_gpu_train_batch_size", "4"]
    mine[mine.index("--max_steps") + 1] = "1"
    train_here(mine)
    scaling = card(out)
    assert (scaling["engine"], scaling["world_size"]) == ("single", 1)
    assert json.loads((out / "checkpoint-1" / "unift_resume.json").read_text())["engine"] == "single"
