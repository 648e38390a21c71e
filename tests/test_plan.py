"""`unift train --plan` and the memory check every run makes (unift.train.plan, unift.train.probe).

On a tiny random llama: --plan prints the plan's fields and writes its JSON without training (no run
folder), the refusal is one line unless --force (UNIFT_AVAILABLE_MIB pretends the machine has little
memory), the batch arithmetic is the sampler's, and the plan's predicted peak RSS and time per step are
within a loose bound of a real run of the same settings, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from after_training_helpers import REPO, cli_result

from unift.train.plan import AVAILABLE_ENV, activation_bytes, optimizer_bytes, planned_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(32)


def argv(base, data_file, out, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(base), "--data", str(data_file), "--output_dir", str(out),
            "--cutoff_len", "64", "--per_gpu_train_batch_size", "4", "--epochs", "2", "--compute_dtype", "fp32",
            "--logging_steps", "1", *extra]


def test_plan_prints_the_plan_and_trains_nothing(base, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    out, plan_file = tmp_path / "run", tmp_path / "plan.json"
    code, stdout, _ = cli_result(argv(base, data_file, out, "--plan", "--plan_json", str(plan_file)), capsys)
    assert code in (0, None)
    assert not out.exists()  # no run folder, no checkpoint, no adapter
    for field in ("gradients", "optimizer state", "activations", "estimated peak RSS", "probe: measured peak RSS",
                  "predicted peak RSS per process", "available", "time per step", "training time"):
        assert field in stdout, field
    plan = json.loads(plan_file.read_text())
    assert plan["run"]["steps"] == 16  # 32 examples / batch 4 x 2 epochs
    assert plan["probe"]["steps"] == 3 and plan["probe"]["timed_steps"] == 2
    # the run's first step as long as the probe's, the other 15 at the steady time per step
    first = plan["probe"]["first_step_seconds"]
    assert plan["seconds_per_step"] > 0 and first > 0
    assert plan["train_seconds"] == pytest.approx(first + 15 * plan["seconds_per_step"])
    assert plan["estimate"]["trainable"] > 0 and plan["predicted_peak_mib"] > plan["estimate"]["weights_mib"]


def test_plan_refuses_beyond_the_available_memory_unless_forced(base, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, "100")
    code, stdout, stderr = cli_result(argv(base, data_file, tmp_path / "a", "--plan", "--plan_steps", "0"), capsys)
    assert code != 0
    errors = [line for line in stderr.splitlines() if line.startswith("unift: error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr  # unift's log lines before it
    assert "exceeds the 100 MiB" in errors[0] and "--force" in errors[0], stderr
    # --force: the probe runs and the plan is printed; the exit says the plan was made
    code, stdout, stderr = cli_result(argv(base, data_file, tmp_path / "b", "--plan", "--plan_steps", "2", "--force"),
                                      capsys)
    assert code in (0, None) and "predicted peak RSS per process" in stdout
    assert not (tmp_path / "b").exists()


def test_a_run_refuses_before_its_first_step(base, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, "100")
    out = tmp_path / "run"
    code, _, stderr = cli_result(argv(base, data_file, out, "--max_steps", "2"), capsys)
    assert code != 0 and "exceeds the 100 MiB" in stderr.strip().splitlines()[-1]
    assert not (out / "metrics.json").exists() and not list(out.glob("checkpoint-*"))
    code, _, _ = cli_result(argv(base, data_file, out, "--max_steps", "2", "--force"), capsys)
    assert code in (0, None) and (out / "metrics.json").is_file()


def test_batches_as_the_sampler_draws_them():
    args = SimpleNamespace(per_gpu_train_batch_size=2, gradient_accumulation_steps=3)
    free = planned_batches([10, 20, 30, 40], args, padding_free=True, multiple=32, steps=5)
    assert free.largest == 96  # 40 + 30 = 70, padded to a multiple of 32
    padded = planned_batches([10, 20, 30, 40], args, padding_free=False, multiple=8, steps=5)
    assert padded.largest == 2 * 40  # every row padded to the longest
    assert free.mean_step == pytest.approx(3 * 64)  # two micro-batches of 100 tokens in all: 64 each, x 3
    assert optimizer_bytes("adamw_torch_fused") == 8 and optimizer_bytes("paged_adamw_8bit") == 2
    assert optimizer_bytes("sgd") == 0


def test_checkpointing_keeps_less():
    config = SimpleNamespace(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             intermediate_size=1536, vocab_size=49152)
    def kept(checkpointing: bool, label_tokens: int) -> float:
        return activation_bytes(config, 1024, compute_bytes=2, checkpointing=checkpointing, label_tokens=label_tokens)

    # the decoder layers' share: a quarter or less once checkpointed
    assert kept(True, 0) < kept(False, 0) / 4
    # the head's logits (fp32, with their gradient) are not checkpointed: the same bytes either way
    assert kept(True, 512) - kept(True, 0) == kept(False, 512) - kept(False, 0) == 512 * 49152 * 8


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(AVAILABLE_ENV, None)
    return subprocess.run([sys.executable, "-m", "unift", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_plan_is_near_a_real_run(base, data_file, tmp_path):
    """Each in a fresh process, so each peak is its own: the plan's predicted peak RSS within 35% of the
    run's, its time per step within a factor 2.5 (a shared 2-core machine's speed moves between runs)."""
    plan_file = tmp_path / "plan.json"
    common = argv(base, data_file, tmp_path / "run", "--max_steps", "12")
    planned = run_cli([*common, "--plan", "--plan_json", str(plan_file)])
    assert planned.returncode == 0, planned.stderr[-2000:]
    trained = run_cli(common)
    assert trained.returncode == 0, trained.stderr[-2000:]
    plan = json.loads(plan_file.read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    measured_step = metrics["wall_seconds"] / metrics["global_steps"]
    assert plan["predicted_peak_mib"] == pytest.approx(metrics["peak_rss_mib"], rel=0.35)
    assert 1 / 2.5 < plan["seconds_per_step"] / measured_step < 2.5, (plan["seconds_per_step"], measured_step)
