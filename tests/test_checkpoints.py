"""Checkpoints that survive faults: SIGKILL mid-run or mid-checkpoint, then a resume, ends exactly where an
uninterrupted run ends; Ctrl-C saves a checkpoint first; a bad run folder fails before training."""

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
from conftest import memorisation_rows
from safetensors.torch import load_file

from unift.train.args import TrainArgs

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "train_worker.py"
STEPS, SAVE_EVERY = 12, 4  # 16 examples, batch 2: the run crosses an epoch boundary after step 8


def flags(model: Path, data: Path, out: Path) -> list[str]:
    # Dropout on (0.1): the resumed run must also restore the RNG to draw the same masks.
    return ["--model_type", "qwen2", "--model_name_or_path", str(model), "--data", str(data),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY),
            "--per_gpu_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--compute_dtype", "fp32", "--lora_dropout", "0.1", "--save_total_limit", "2"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_paused(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 300
    while not (out / "paused").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its pause: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.05)


def train_here(flags: list[str]) -> None:
    """The uninterrupted and the resumed runs train in this process (one thread, as the killed ones):
    the same arithmetic, without a second interpreter start-up for each."""
    from unift.cli import parse
    from unift.options import parse_into
    from unift.train.run import train

    train(parse_into(TrainArgs, parse(["train", *flags])))


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory, one_torch_thread):
    """The data, and the uninterrupted run every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorisation_rows(16)), encoding="utf-8")
    model = tiny_model("qwen2")
    train_here(flags(model, data, root / "whole"))
    return model, data, root


def losses(out: Path) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in json.loads((out / "metrics.json").read_text())["loss_curve"]]


def assert_same_run(out: Path, whole: Path) -> None:
    got, expected = losses(out), losses(whole)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "a step was skipped or repeated"
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]),
                               rtol=1e-5, atol=0)
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (out, whole))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("pause", "latest"), [
    (["--pause_at", "6"], 4),  # killed between checkpoints
    (["--pause_publish", "8"], 4),  # killed while checkpoint-8 was written but not yet in place
], ids=["mid-step", "mid-checkpoint"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, pause, latest):
    model, data, root = setup
    out = root / f"killed-{pause[0].strip('-')}"
    proc = start([*pause, "--", *flags(model, data, out)], root)
    wait_paused(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{latest}"]
    assert not (out / "adapter_model.safetensors").exists()

    train_here([*flags(model, data, out), "--resume_from_checkpoint"])
    assert_same_run(out, root / "whole")
    # The end of the run is a checkpoint too, and only complete checkpoints are ever visible.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert not (out / ".staging").exists()


def test_ctrl_c_saves_a_checkpoint_then_stops(setup):
    model, data, root = setup
    out = root / "ctrl-c"
    proc = start(["--pause_at", "5", "--", *flags(model, data, out)], root)
    wait_paused(proc, out)
    proc.send_signal(signal.SIGINT)  # during step 5's end: training stops after step 6 with a checkpoint
    time.sleep(0.2)
    (out / "release").touch()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped at step 6 of 12" in stderr and "--resume_from_checkpoint" in stderr
    saved = out / "checkpoint-6"
    assert (saved / "optimizer.pt").exists() and (saved / "adapter_model.safetensors").exists()
    assert (saved / "unift_run.json").exists()
    assert not (out / "adapter_model.safetensors").exists()  # an interrupted run is not a finished one
    (out / "paused").unlink()
    train_here([*flags(model, data, out), "--resume_from_checkpoint"])
    assert_same_run(out, root / "whole")


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    from unift.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "--output_dir", str(blocker / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unift: error: --output_dir {blocker / 'run'}: not writable (Not a directory)")
    if os.geteuid() != 0:  # root writes anywhere; elsewhere a read-only folder must be refused too
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["train", "--output_dir", str(locked)]) == 2
        assert "not writable (Permission denied)" in capsys.readouterr().err


def test_a_full_disk_is_refused_with_the_space_needed(tmp_path):
    import shutil

    from unift.errors import UniftError
    from unift.train.checkpoints import check_output_dir

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UniftError, match=r"--output_dir .*: \d+ MiB free, the checkpoints need about \d+ MiB"):
        check_output_dir(tmp_path / "run", need_bytes=free + 2**30)
    assert check_output_dir(tmp_path / "run", need_bytes=1) == tmp_path / "run"


def test_a_checkpoint_that_cannot_be_written_names_the_last_complete_one(setup):
    model, data, root = setup
    out = root / "blocked"
    proc = start(["--pause_at", "5", "--", *flags(model, data, out)], root)
    wait_paused(proc, out)
    (out / ".staging").write_text("a file where the staging folder goes")  # every later write fails
    (out / "release").touch()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert (f"unift: error: cannot write checkpoint-8 in {out} (Not a directory); the last complete checkpoint is "
            "checkpoint-4\n") in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
