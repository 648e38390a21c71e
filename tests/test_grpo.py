"""--stage grpo and --adapter_dir: the built-in rewards, your own reward file and its mistakes, prompts rendered
as supervised training renders them, GRPO moving a real policy toward what a reward pays for on a tiny
model, and runs that start from an earlier run (SFT -> SFT, SFT -> DPO, SFT -> GRPO) with that run as the
reference."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import FAMILIES, memorisation_rows

from unift.cli import main
from unift.data import DataOptions, build_datasets, load_sources, resolve_template
from unift.data.tokenize import encode_conversation
from unift.errors import UniftError
from unift.models import load_tokenizer
from unift.models.runcard import RunCard
from unift.train.args import TrainArgs
from unift.train.rewards import exact_answer, format_reward, length_reward, reward_function
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARITH = [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}.\nAnswer: {a + b}"}
         for a, b in [(3, 4), (12, 30), (7, 8), (21, 5), (9, 9), (40, 2), (6, 13), (15, 15)]]


# ---- rewards ------------------------------------------------------------------------------------------


def test_exact_answer_reads_the_answer_line_else_the_last_number():
    refs = ["3 + 4 = 7.\nAnswer: 7"] * 4 + ["The total is 1,250."]
    got = exact_answer(["3 + 4 = 7.\nAnswer: 7", "Answer: 8", "so 7", "Answer: 7 apples", "1250 in all"], refs)
    assert got == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert exact_answer(["Answer: 7"], ["no number here"]) == [0.0]  # nothing to compare with: no reward


def test_format_pays_for_the_answer_line_once_at_the_end():
    ref = ["12 + 30 = 42.\nAnswer: 42"]
    assert format_reward(["12 + 30 = 41.\nAnswer: 41"], ref) == [1.0]  # the shape, not the value
    assert format_reward(["Answer: 41\nthen more text"], ref) == [0.5]
    assert format_reward(["Answer: 41\nAnswer: 42"], ref) == [0.5]
    assert format_reward(["forty-two"], ref) == [0.0]


def test_length_rewards_answers_as_long_as_the_reference():
    assert length_reward(["abcd", "ab", "abcdefgh", ""], ["abcd"] * 4) == [1.0, 0.5, 0.0, 0.0]


def test_reward_file_mistakes_are_one_line_each(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text("def short(completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
                    "def wrong_count(completions, **kw):\n    return [0.0]\n"
                    "def not_numbers(completions, **kw):\n    return ['yes' for c in completions]\n")
    assert reward_function(f"{good}:short")(completions=["", "abc"]) == [1.0, 0.25]
    cases = {
        f"{tmp_path / 'absent.py'}:f": "no such file",
        f"{good}:missing": "has no function 'missing' (it has not_numbers, short, wrong_count)",
        "no_such_reward": "not a built-in reward",
    }
    for spec, message in cases.items():
        with pytest.raises(UniftError, match="^--reward_funcs .*" + message.replace("(", r"\(").replace(")", r"\)")):
            TrainArgs(stage="grpo", reward_funcs=[spec])
    with pytest.raises(UniftError, match="returned 1 values for 2 completions"):
        reward_function(f"{good}:wrong_count")(completions=["a", "b"])
    with pytest.raises(UniftError, match="returned 'yes'; rewards are numbers"):
        reward_function(f"{good}:not_numbers")(completions=["a", "b"])


def test_grpo_flag_checks_at_parse_time():
    with pytest.raises(UniftError, match=r"\(6\) counts completions and must be a multiple of --num_generations \(4\)"):
        TrainArgs(stage="grpo", per_gpu_train_batch_size=6)
    with pytest.raises(UniftError, match="--reward_weights has 1 values for 2 --reward_funcs"):
        TrainArgs(stage="grpo", reward_funcs=["exact_answer,format"], reward_weights=[1.0])
    with pytest.raises(UniftError, match="--num_generations is not used by --stage dpo"):
        TrainArgs(stage="dpo", num_generations=8)
    with pytest.raises(UniftError, match="--pref_beta > 0 does not work with --peft_type adalora"):
        TrainArgs(stage="grpo", peft_type="adalora", pref_beta=0.04)
    with pytest.raises(UniftError, match="--pref_beta must be > 0 for --stage dpo"):
        TrainArgs(stage="dpo", pref_beta=0.0)
    assert TrainArgs(stage="grpo", reward_funcs=["exact_answer,format"]).reward_funcs == ["exact_answer", "format"]


def test_prompt_rows_are_the_supervised_prompt_and_reference(embedded_dir, write_jsonl):
    tokenizer = load_tokenizer(str(embedded_dir))
    template = resolve_template("chatml", "chatml", tokenizer)
    options = DataOptions(data=[str(write_jsonl(ARITH))], kind="prompts")
    bundle = build_datasets(load_sources(options), template, tokenizer, options)
    assert bundle.train.column_names == ["prompt", "prompt_ids", "reference"]
    by_reference = {row["reference"]: row for row in bundle.train}
    record = ARITH[1]
    row = by_reference[record["output"]]
    messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    sft = encode_conversation(messages, template, tokenizer, 512, False)
    first_answer = next(i for i, label in enumerate(sft.labels) if label != -100)
    assert row["prompt_ids"] == sft.input_ids[:first_answer]  # token for token what SFT trained after
    assert row["prompt"].endswith("<|im_start|>assistant\n") and record["instruction"] in row["prompt"]


def test_pairs_are_refused_by_grpo_with_the_record_named(tmp_path, write_jsonl):
    path = write_jsonl([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    with pytest.raises(UniftError, match=f"{path}: record 1: this record holds preference pairs .* instruction data"):
        load_sources(DataOptions(data=[str(path)], kind="prompts"))


# ---- training -----------------------------------------------------------------------------------------


def run_args(folder, data, out, **extra) -> TrainArgs:
    values = dict(model_type="llama", model_name_or_path=str(folder), output_dir=str(out), data=[str(data)],
                  max_steps=4, per_gpu_train_batch_size=4, cutoff_len=64, learning_rate=2e-2, warmup_ratio=0.0,
                  lr_scheduler_type="constant", logging_steps=1, save_steps=1000, compute_dtype="fp32",
                  template="chatml")
    return TrainArgs(**{**values, **extra})


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory):
    """A short supervised run on the tiny llama: the parent of the runs below."""
    folder = tmp_path_factory.mktemp("sft")
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ARITH), encoding="utf-8")
    train(run_args(tiny_model("llama"), data, folder / "run", lora_r=4, lora_alpha=8, max_steps=30,
                   learning_rate=3e-2))
    return folder / "run", data


AVOID_TOP = """import json
TOP = json.loads({top!r})
def avoid_top(prompts, completion_ids, **kw):
    return [float(len(ids) > 0 and ids[0] != TOP[p]) for p, ids in zip(prompts, completion_ids)]
"""


def first_token_probs(model, rows) -> torch.Tensor:
    """Per prompt, the policy's distribution over the first answer token."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([row["prompt_ids"]])).logits[0, -1].float().softmax(-1)
                            for row in rows])


def test_grpo_moves_the_policy_away_from_what_the_reward_refuses(sft_run, tmp_path):
    """A reward for any first token but the one the parent run likes most, prompt by prompt: after a few
    GRPO steps the policy puts less mass there. The run folder is an ordinary run: its card names the stage
    and the parent, metrics.json keeps the reward curve."""
    from unift.loader import load

    parent, data = sft_run
    before = load(str(parent), dtype="fp32")
    options = DataOptions(data=[str(data)], kind="prompts")
    rows = list(build_datasets(load_sources(options), before.template, before.tokenizer, options).train)
    probs = first_token_probs(before.model, rows)
    top = probs.argmax(-1)
    start = float(probs.gather(1, top[:, None]).mean())
    rewards = tmp_path / "rewards.py"
    rewards.write_text(AVOID_TOP.format(top=json.dumps({r["prompt"]: int(t) for r, t in zip(rows, top)})))
    args = run_args(None, data, tmp_path / "grpo", model_name_or_path=None, stage="grpo", adapter_dir=str(parent),
                    reward_funcs=[f"{rewards}:avoid_top"], num_generations=4, per_gpu_train_batch_size=8,
                    max_completion_length=4, max_steps=6, learning_rate=3e-2,
                    optim="adamw_torch")  # Adam: a few steps on a tiny model (SGD's gain is measured in the docs)
    assert (args.peft_type, args.lora_r, args.model_name_or_path) == ("lora", 4, RunCard.load(parent).base_model)
    result = train(args)
    after = first_token_probs(load(str(tmp_path / "grpo"), dtype="fp32").model, rows)
    end = float(after.gather(1, top[:, None]).mean())
    assert end < start / 2, (start, end)  # measured: 1.2% -> 0.48%
    card = RunCard.load(tmp_path / "grpo")
    assert card.stage == "grpo" and card.parent["folder"] == str(parent.resolve()) and card.parent["stage"] == "sft"
    curve = result.metrics["reward_curve"]
    assert len(curve) == 6 and all(0 <= point["reward"] <= 1 for point in curve)
    assert {"reward_std", "completions/mean_length", "rewards/avoid_top/mean"} <= set(curve[0])
    assert (tmp_path / "grpo" / "loss.png").stat().st_size > 0  # with the reward panel
    assert not (tmp_path / "grpo" / "ref").exists()


def test_grpo_reference_is_the_parent_run(sft_run, tmp_path):
    """With --adapter_dir and a KL term, the reference is the adapter as the run started: the first step's
    KL is zero (against the base with the adapter off it would not be: the parent moved away from it)."""
    parent, data = sft_run
    result = train(run_args(None, data, tmp_path / "grpo", model_name_or_path=None, stage="grpo",
                            adapter_dir=str(parent), reward_funcs=["length"], pref_beta=0.1, num_generations=4,
                            per_gpu_train_batch_size=4, max_completion_length=4, max_steps=2))
    kl = [point["kl"] for point in result.metrics["reward_curve"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and math.isfinite(kl[1])


def test_dpo_from_an_sft_run_starts_at_ln2_against_it(sft_run, tmp_path, write_jsonl):
    """SFT, then DPO on top: the policy starts as the SFT adapter and so does the reference, so the first
    DPO loss is ln 2 exactly; without the parent as reference it would not be."""
    parent, _ = sft_run
    pairs = write_jsonl([{"prompt": r["instruction"], "chosen": r["output"], "rejected": "Answer: 0"} for r in ARITH])
    result = train(run_args(None, pairs, tmp_path / "dpo", model_name_or_path=None, stage="dpo",
                            adapter_dir=str(parent), max_steps=3, learning_rate=2e-3))
    curve = [p["loss"] for p in result.metrics["loss_curve"]]
    assert curve[0] == pytest.approx(math.log(2), abs=1e-4) and curve[-1] < curve[0], curve
    assert not (tmp_path / "dpo" / "ref").exists()


def test_sft_continues_from_the_parent_weights(sft_run, tmp_path, write_jsonl):
    """--adapter_dir trains the saved adapter further: the first step starts from its weights (the loss of
    the first step equals the parent's loss on the same batch, which a fresh adapter would not give)."""
    parent, data = sft_run
    from transformers import TrainerCallback

    seen = {}

    class FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["start"] = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}

    train(run_args(None, data, tmp_path / "more", model_name_or_path=None, adapter_dir=str(parent), max_steps=2),
          callbacks=[FirstWeights()])
    from safetensors.torch import load_file

    saved = load_file(str(parent / "adapter_model.safetensors"))
    saved_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert saved_b and len(seen["start"]) == len(saved_b)
    for name, value in seen["start"].items():
        key = next(k for k in saved_b if k.replace(".weight", "") in name)
        assert torch.equal(value, saved_b[key])
    assert any(float(v.abs().sum()) > 0 for v in saved_b.values())  # a trained parent, not a fresh B = 0


def test_adapter_dir_contradictions_are_one_line(sft_run, tmp_path, capsys):
    parent, data = sft_run
    base = ["train", "--adapter_dir", str(parent), "--data", str(data), "--output_dir", str(tmp_path / "x")]
    for extra, message in ((["--peft_type", "dora"], "holds a lora adapter; --peft_type dora contradicts it"),
                           (["--lora_r", "16"], "--lora_r: the adapter in"),
                           (["--stage", "rm"], "a reward model (rm) continues only as a reward model")):
        assert main([*base, *extra]) != 0
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert main(["train", "--adapter_dir", str(tmp_path / "nowhere"), "--data", str(data)]) != 0
    assert "no such folder" in capsys.readouterr().err


def test_memorisation_rows_train_as_prompts(tiny_model, tmp_path, write_jsonl):
    """grpo from scratch (no parent), on plain instruction data, with the built-in rewards summed."""
    data = write_jsonl(memorisation_rows(4))
    result = train(run_args(tiny_model("llama"), data, tmp_path / "g", stage="grpo",
                            reward_funcs=["exact_answer", "format", "length"], reward_weights=[1.0, 0.5, 0.1],
                            per_gpu_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=2))
    assert len(result.metrics["reward_curve"]) == 2 and result.metrics["global_steps"] == 2
    assert RunCard.load(tmp_path / "g").parent is None


def test_a_reward_model_run_scores_the_completions(tiny_model, tmp_path, write_jsonl):
    """--reward_funcs RUN: a --stage rm run folder scores prompt + completion as it was trained to; its
    scores are real numbers that differ between completions (a constant would train nothing)."""
    pairs = write_jsonl([{"prompt": r["instruction"], "chosen": r["output"], "rejected": "Answer: 0"} for r in ARITH],
                        "pairs.jsonl")
    train(run_args(tiny_model("llama"), pairs, tmp_path / "rm", stage="rm", max_steps=2))
    prompts = write_jsonl(ARITH, "prompts.jsonl")
    result = train(run_args(tiny_model("llama"), prompts, tmp_path / "g", stage="grpo",
                            reward_funcs=[str(tmp_path / "rm")], num_generations=4, per_gpu_train_batch_size=4,
                            max_completion_length=4, max_steps=2))
    curve = result.metrics["reward_curve"]
    assert all(math.isfinite(p["reward"]) and p["reward_std"] > 0 for p in curve), curve
    with pytest.raises(UniftError, match="a folder must be a --stage rm run"):
        TrainArgs(stage="grpo", reward_funcs=[str(tmp_path / "g")])


def test_conversations_prompt_with_every_turn_before_the_last_answer(embedded_dir, write_jsonl):
    tokenizer = load_tokenizer(str(embedded_dir))
    template = resolve_template("chatml", "chatml", tokenizer)
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                           {"role": "assistant", "content": "Answer: 4"}, {"role": "user", "content": "And 3 + 3?"},
                           {"role": "assistant", "content": "Answer: 6"}]}
    options = DataOptions(data=[str(write_jsonl([record]))], kind="prompts")
    row = build_datasets(load_sources(options), template, tokenizer, options).train[0]
    assert row["reference"] == "Answer: 6"
    assert "Be brief." in row["prompt"] and "Answer: 4" in row["prompt"] and "And 3 + 3?" in row["prompt"]
    assert "Answer: 6" not in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")


def grpo_pairs() -> list[tuple[str, str]]:
    """(family, method): LoRA on every family, and in CI one method of each kind on llama (virtual tokens,
    quantized base, rescaling, modules of their own, the model's own weights); every method with
    UNIFT_ALL_STAGE_PAIRS=1."""
    from unift.train.stages import stage_matrix

    methods = [m for m, why in stage_matrix()["grpo"].items() if not why and m != "lora"]
    if not os.environ.get("UNIFT_ALL_STAGE_PAIRS"):
        methods = [m for m in methods if m in ("prefix", "p-tuning", "qlora", "adalora", "ia3", "adapters", "full", "freeze")]
    return [(family, "lora") for family in FAMILIES] + [("llama", m) for m in methods]


@pytest.mark.parametrize("family, method", grpo_pairs())
def test_grpo_trains_every_family_and_method(tiny_model, tmp_path, write_jsonl, family, method, dtype_plan):
    """Two GRPO steps under each dtype plan: sampling, rewards and the update run, and what trains moves."""
    from transformers import TrainerCallback

    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")
    weights = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            weights["start"] = {k: v.detach().float().clone() for k, v in model.named_parameters() if v.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights["end"] = {k: v.detach().float().clone() for k, v in model.named_parameters() if v.requires_grad}

    data = write_jsonl(memorisation_rows(4))
    rewards = tmp_path / "rewards.py"  # differs between any two completions that start differently
    rewards.write_text("def first_id(completion_ids, **kw):\n    return [float(ids[0] % 7) if len(ids) else -1.0 "
                       "for ids in completion_ids]\n")
    result = train(run_args(tiny_model(family), data, tmp_path / "g", model_type=family, peft_type=method,
                            stage="grpo", reward_funcs=[f"{rewards}:first_id"], num_generations=4, per_gpu_train_batch_size=4,
                            max_completion_length=6, max_steps=2, compute_dtype="auto",
                            learning_rate=5e-2 if method in ("ia3", "prompt", "prefix", "vera") else 2e-2),
                   callbacks=[Watch()])
    curve = result.metrics["reward_curve"]
    assert len(curve) == 2 and all(math.isfinite(p["reward"]) for p in curve)
    assert weights["start"] and any(not torch.equal(weights["start"][k], weights["end"][k]) for k in weights["start"])
    assert RunCard.load(tmp_path / "g").stage == "grpo"


def test_grpo_trains_with_sgd_unless_an_optimizer_is_given():
    """GRPO's own optimizer settings fill the flags left at their defaults, and only without --optim."""
    common = dict(stage="grpo", reward_funcs=["exact_answer"], per_gpu_train_batch_size=8, num_generations=4)
    settings = ("optim", "learning_rate", "lr_scheduler_type", "warmup_ratio")
    assert [getattr(TrainArgs(**common), k) for k in settings] == ["sgd", 0.3, "constant", 0.0]
    assert [getattr(TrainArgs(**common, learning_rate=0.1), k) for k in settings] == ["sgd", 0.1, "constant", 0.0]
    assert [getattr(TrainArgs(**common, optim="adamw_torch"), k) for k in settings] == ["adamw_torch", 3e-4, "cosine",
                                                                                       0.03]
    assert [getattr(TrainArgs(), k) for k in settings] == [None, 3e-4, "cosine", 0.03]  # sft keeps its own
