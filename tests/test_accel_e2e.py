"""End to end: `--optimizations all` trains what `--optimizations none` trains.

test_accel.py checks each lever on one batch; this runs whole trainings through `unift.train.run.train`
(tens of optimizer steps on a tiny model, a tiny memorisation task) and compares what users see: the
loss at every step, the held-out evaluation loss, and the greedy answers' exact match after training.

The tolerances are what docs/performance.md states ("What each speed-up changes numerically"):
- fp32 compute (the fp32 plan; here every lever but base_dtype applies; base_dtype steps aside in fp32; the model's
  weights are bf16 values, as a bf16 checkpoint's are, so bf16_storage applies, which is exact): the levers
  change only the order of floating-point sums, so every step's loss over 40 steps agrees to 0.5%
  (relative), the held-out loss to 0.1%, and the greedy answers of the 8 trained keys to within one;
- bf16 compute (the bf16 plan, where every lever but bf16_storage applies): base_dtype stores the frozen base in bf16, a precision change of the frozen weights
  (8 significant bits instead of 24). Against the same run with the base kept in fp32 (under bf16
  autocast either way, every other lever on) the first 10 steps' losses agree to 2% and the mean loss
  over 20 steps to 3%.
"""

from __future__ import annotations

import json

import pytest
import torch

from unift.accel import OPTIMIZATIONS
from unift.inference.generator import Generator
from unift.models.dtypes import torch_dtype
from unift.models.runcard import RunCard
from unift.train.args import TrainArgs
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The key is the whole prompt, so the 2-layer random model can tell the rows apart within 40 steps
# (measured: 8 of 8 answered exactly; "code word number i" prompts reached 1-2 of 8).
KEYS = ["apple", "river", "candle", "mountain", "violin", "tiger", "window", "rocket"]
ANSWERS = ["blue", "seven", "quiet", "north", "paper", "green", "storm", "salt"]
HELD_OUT = 4  # extra rows, evaluated (loss) but never trained


def run(model_dir, data, out, optimizations: str, compute: str, steps: int, answer: bool = True) -> tuple[dict, int]:
    """Train; the metrics and how many of the trained keys the greedy answer gets exactly right."""
    args = TrainArgs(
        model_name_or_path=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=steps,
        save_steps=10_000, val_set_size=HELD_OUT, per_gpu_train_batch_size=4, cutoff_len=32,
        learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        lora_dropout=0.0,  # dropout masks come from different samplers with and without fast_dropout
        optimizations=optimizations, compute_dtype=compute, seed=0,
    )
    metrics = train(args).metrics
    if not answer:
        return metrics, -1
    card = RunCard.load(out)
    generator = Generator.load(str(out), dtype=torch_dtype(card.base_dtype))
    answers = generator.generate([[{"role": "user", "content": k}] for k in KEYS])
    exact = sum(a.text.strip() == want for a, want in zip(answers, ANSWERS))
    return metrics, exact


@pytest.fixture
def memorisation_data(write_jsonl):
    rows = [{"instruction": k, "input": "", "output": a} for k, a in zip(KEYS, ANSWERS)]
    rows += [{"instruction": f"unseen {i}", "input": "", "output": f"held {i}"} for i in range(HELD_OUT)]
    return write_jsonl(rows)


def curve(metrics: dict) -> list[float]:
    return [p["loss"] for p in metrics["loss_curve"]]


@pytest.fixture(scope="module")
def bf16_valued_model(tiny_model, tmp_path_factory):
    """The tiny llama with every weight rounded to a bf16 value, stored in fp32: what loading a bf16
    checkpoint for fp32 compute gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    folder = tmp_path_factory.mktemp("tiny-llama-bf16-values")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_all_optimizations_train_the_same_losses_and_answers(bf16_valued_model, memorisation_data, tmp_path,
                                                             dtype_plan):
    model = bf16_valued_model
    plain, plain_exact = run(model, memorisation_data, tmp_path / "none", "none", "auto", steps=40)
    fast, fast_exact = run(model, memorisation_data, tmp_path / "all", "all", "auto", steps=40)
    assert plain["optimizations"] == [] and plain["compute_dtype"] == fast["compute_dtype"] == dtype_plan
    # fast_dropout has no dropout module to replace at lora_dropout 0; base_dtype steps aside in fp32, and
    # bf16_storage under bf16 compute (base_dtype stores the base in bf16 itself); merged_sampling is GRPO's
    idle = {"fast_dropout", "base_dtype" if dtype_plan == "fp32" else "bf16_storage", "merged_sampling"}
    assert {a.split(" ")[0] for a in fast["optimizations"]} == set(OPTIMIZATIONS) - idle
    assert set(fast["optimizations_skipped"]) == idle  # each with its reason in the log
    assert plain["tokens_trained"] == fast["tokens_trained"]  # the same labelled tokens (no pads counted)
    slow_curve, fast_curve = curve(plain), curve(fast)
    assert len(slow_curve) == len(fast_curve) == 40
    assert slow_curve[-1] < 0.25 * slow_curve[0]  # it learned: the comparison is not between two flat lines
    held = [plain["eval_loss"][-1]["loss"], fast["eval_loss"][-1]["loss"]]
    if dtype_plan == "fp32":
        # measured: steps 1-30 within 2e-5 relative, the last steps drifting up to 0.17% (sums in another order)
        torch.testing.assert_close(fast_curve, slow_curve, rtol=5e-3, atol=0)
        assert held[0] == pytest.approx(held[1], rel=1e-3)
    else:
        # the bf16 base is a precision change (the next test's tolerance), the other levers reorder sums
        torch.testing.assert_close(fast_curve[:10], slow_curve[:10], rtol=2e-2, atol=0)
        assert sum(fast_curve) == pytest.approx(sum(slow_curve), rel=3e-2)
        # the held-out rows were never trained: after 40 steps of memorisation their loss (about 5-6
        # nats) follows where the two trainings drifted (measured 14% apart); a lever that broke the loss
        # (wrong tokens, lost rows) leaves the training curve above, not only this one
        assert held[0] == pytest.approx(held[1], rel=0.3)
    # greedy answers after training: memorised by both, and within one row of each other
    assert plain_exact >= 4 and abs(plain_exact - fast_exact) <= 1, (plain_exact, fast_exact)


def test_bf16_frozen_base_changes_losses_only_within_the_stated_tolerance(tiny_model, memorisation_data,
                                                                          tmp_path):
    model = tiny_model("llama")
    without = ",".join(n for n in OPTIMIZATIONS if n != "base_dtype")  # everything else the same
    # no generation here: bf16 is emulated on CPUs without AVX512-BF16, and slow
    fp32_base, _ = run(model, memorisation_data, tmp_path / "fp32base", without, "bf16", steps=20, answer=False)
    bf16_base, _ = run(model, memorisation_data, tmp_path / "bf16base", "all", "bf16", steps=20, answer=False)
    cards = [json.loads((tmp_path / name / "unift_run.json").read_text()) for name in ("fp32base", "bf16base")]
    assert [c["base_dtype"] for c in cards] == ["fp32", "bf16"]  # the one difference between the runs
    slow_curve, fast_curve = curve(fp32_base), curve(bf16_base)
    assert slow_curve[-1] < 0.5 * slow_curve[0]
    assert slow_curve != fast_curve  # a precision change, not a reordering: the losses do move
    # measured: the first 10 steps within 1.2%, the mean over the 20 steps 0.8% lower (single later
    # steps up to 8% apart, as two trainings at lr 1e-2 on 8 rows drift apart)
    torch.testing.assert_close(fast_curve[:10], slow_curve[:10], rtol=2e-2, atol=0)
    assert sum(fast_curve) == pytest.approx(sum(slow_curve), rel=3e-2)
