"""--stage: preference data (TRL's layouts and LLaMA-Factory's ranking and kto_tag entries), its tokenization
with the run's template, every stage training through the real TRL trainers on tiny models of every family,
the reference being the base with the adapter off, parse-time refusals, and `unift eval --pairs`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from unift.cli import main
from unift.data import (
    DataOptions,
    build_datasets,
    encode_conversation,
    load_sources,
    resolve_template,
    to_conversations,
)
from unift.data.preference import encode_preference
from unift.errors import UniftError
from unift.models import load_tokenizer
from unift.models.runcard import RunCard
from unift.peft import method_names
from unift.train.args import TrainArgs
from unift.train.run import train
from unift.train.stages import README_END, README_START, stage_matrix, stage_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [{"prompt": f"What is the code word number {i}?", "chosen": f"THE WORD IS W{i * 7}.",
          "rejected": f"The word is w{i * 7}."} for i in range(8)]
UNPAIRED = [{"prompt": f"What is the code word number {i}?", "completion": f"The word is w{i * 7}.",
             "label": i % 2 == 0} for i in range(8)]
STAGES = ["dpo", "orpo", "simpo", "kto"]
# The loss of the first step, before any update, where the stage's formula fixes it: the reference is the
# base with the adapter off, and LoRA starts as the identity, so policy and reference agree
FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref")
    for name, rows in (("pairs.jsonl", PAIRS), ("unpaired.jsonl", UNPAIRED)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def chat(embedded_dir):
    tokenizer = load_tokenizer(str(embedded_dir))
    return tokenizer, resolve_template(None, "chatml", tokenizer)


def write(path, rows) -> str:
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


# ---- layouts ----------------------------------------------------------------------------------------


def test_trl_paired_layouts_text_messages_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": [{"role": "assistant", "content": "Lyon"}]},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    ]
    got = to_conversations(Path(write(tmp_path / "p.jsonl", rows)))
    assert got[0] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "rejected": "5"}]
    assert got[1][0] == {"role": "system", "content": "Be brief."}
    assert got[1][-1] == {"role": "assistant", "content": "Paris", "rejected": "Lyon"}
    assert got[2] == [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!", "rejected": "Go away."}]


def test_llamafactory_ranking_entries_read_unchanged(tmp_path):
    write(tmp_path / "alpaca_rank.json", [{"instruction": "Add 1 and 1", "input": "now", "chosen": "2", "rejected": "3",
                                           "history": [["Hi", "Hello"]]}])
    write(tmp_path / "sharegpt_rank.json", [{"conversations": [{"from": "human", "value": "Name a colour"}],
                                             "chosen": {"from": "gpt", "value": "Blue"},
                                             "rejected": {"from": "gpt", "value": "Dog"}}])
    info = {"a_rank": {"file_name": "alpaca_rank.json", "ranking": True,
                       "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                   "rejected": "rejected", "history": "history"}},
            "s_rank": {"file_name": "sharegpt_rank.json", "formatting": "sharegpt", "ranking": True,
                       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    sources = load_sources(DataOptions(data=["a_rank", "s_rank"], dataset_dir=str(tmp_path), kind="pairs"))
    alpaca, sharegpt = (s.conversations[0] for s in sources)
    assert alpaca == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Add 1 and 1\n\nnow"},
                      {"role": "assistant", "content": "2", "rejected": "3"}]
    assert sharegpt == [{"role": "user", "content": "Name a colour"},
                        {"role": "assistant", "content": "Blue", "rejected": "Dog"}]


def test_unpaired_layouts_trl_and_kto_tag(tmp_path):
    trl = to_conversations(Path(write(tmp_path / "k.jsonl", UNPAIRED[:2])))
    assert [c[-1]["label"] for c in trl] == [True, False]
    write(tmp_path / "tag.json", [{"instruction": "Hi", "output": "Hello", "kto_tag": "false"}])
    assert to_conversations(tmp_path / "tag.json")[0][-1] == {"role": "assistant", "content": "Hello", "label": False}
    write(tmp_path / "tag2.json", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
                                    "kto_tag": True}])
    assert to_conversations(tmp_path / "tag2.json")[0][-1]["label"] is True


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label' must be true or false, found 'yes'"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
     "must share every turn but the last"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a text or a non-empty list"),
])
def test_bad_preference_records_name_file_record_and_field(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [PAIRS[0], row])
    with pytest.raises(UniftError, match=f"bad.jsonl: record 2: .*{message}"):
        to_conversations(Path(path))


def test_empty_answers_are_skipped_and_reported_or_refused(tmp_path, files):
    path = write(tmp_path / "some_empty.jsonl", [*PAIRS, {"prompt": "q", "chosen": "a", "rejected": " "}])
    sources = load_sources(DataOptions(data=[path], kind="pairs"))
    assert sources[0].skipped["count"] == 1 and sources[0].records == len(PAIRS)
    with pytest.raises(UniftError, match="record 9: field 'rejected' is empty.*--strict_data"):
        load_sources(DataOptions(data=[path], kind="pairs", strict_data=True))


@pytest.mark.parametrize("data, kind, message", [
    ("pairs.jsonl", "sft", "holds preference pairs .* trains on instruction data; pairs train with --stage dpo"),
    ("pairs.jsonl", "unpaired", "holds preference pairs .* labelled desirable or not .*; pairs train with"),
    ("unpaired.jsonl", "pairs", "holds answers labelled .* trains on preference pairs .*; labelled answers train "
                                "with --stage kto"),
])
def test_data_of_another_kind_is_refused_with_the_stage_to_use(files, data, kind, message):
    with pytest.raises(UniftError, match=f"{data}: record 1: this record {message}"):
        load_sources(DataOptions(data=[str(files / data)], kind=kind))


# ---- tokenization ------------------------------------------------------------------------------------


def test_answers_are_tokenized_as_supervised_answers_are(chat):
    tokenizer, template = chat
    messages = [{"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris", "rejected": "Lyon is the capital."}]
    row = encode_preference(messages, template, tokenizer, cutoff_len=512)
    for key, text in (("chosen_ids", "Paris"), ("rejected_ids", "Lyon is the capital.")):
        sft = encode_conversation([messages[0], {"role": "assistant", "content": text}], template, tokenizer, 512)
        assert row["prompt_ids"] + row[key] == sft.input_ids
        assert row[key] == [t for t in sft.labels if t != -100]  # the answer with its end of turn
    assert tokenizer.decode(row["chosen_ids"]).startswith("Paris<|im_end|>")


def test_cutoff_rules_drop_keep_and_split(chat):
    tokenizer, template = chat
    long_prompt = " ".join(["word"] * 60)
    messages = [{"role": "user", "content": long_prompt},
                {"role": "assistant", "content": "short", "rejected": "a slightly longer answer"}]
    whole = encode_preference(messages, template, tokenizer, cutoff_len=10**6)
    answers = max(len(whole["chosen_ids"]), len(whole["rejected_ids"]))
    cut = encode_preference(messages, template, tokenizer, cutoff_len=40)
    assert cut["truncated"] and len(cut["prompt_ids"]) + answers == 40
    assert cut["prompt_ids"] == whole["prompt_ids"][-len(cut["prompt_ids"]):]  # the prompt lost its front
    assert (cut["chosen_ids"], cut["rejected_ids"]) == (whole["chosen_ids"], whole["rejected_ids"])
    long_answer = [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "ok", "rejected": " ".join(["no"] * 60)}]
    prompt = len(encode_preference(long_answer, template, tokenizer, 10**6)["prompt_ids"])
    dropped = encode_preference(long_answer, template, tokenizer, cutoff_len=prompt + 5)
    assert dropped["trained"] == 0 and dropped["long_answer"]  # drop: an answer alone fills the cutoff
    kept = encode_preference(long_answer, template, tokenizer, cutoff_len=prompt + 5, truncation="keep")
    assert kept["trained"] > 0 and len(kept["prompt_ids"]) == prompt and len(kept["rejected_ids"]) == 5
    split = encode_preference(messages, template, tokenizer, cutoff_len=30, truncation="split")
    assert len(split["prompt_ids"]) + max(len(split["chosen_ids"]), len(split["rejected_ids"])) <= 30
    assert split["prompt_ids"] == whole["prompt_ids"][:len(split["prompt_ids"])]  # split keeps the start


def test_pipeline_counts_pairs_and_keeps_only_the_stage_columns(files, chat):
    tokenizer, template = chat
    options = DataOptions(data=[str(files / "pairs.jsonl")], kind="pairs", val_set_size=2)
    bundle = build_datasets(load_sources(options), template, tokenizer, options)
    assert bundle.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (len(bundle.train), len(bundle.val), bundle.stats["pairs"]) == (6, 2, 8)


# ---- training -----------------------------------------------------------------------------------------


def stage_args(stage: str, folder, files, out, **extra) -> TrainArgs:
    values = dict(model_type="llama", model_name_or_path=str(folder), stage=stage, output_dir=str(out),
                  data=[str(files / ("unpaired.jsonl" if stage == "kto" else "pairs.jsonl"))],
                  max_steps=4, per_gpu_train_batch_size=4, cutoff_len=48, learning_rate=2e-2, warmup_ratio=0.0,
                  lr_scheduler_type="constant", logging_steps=1, save_steps=1000, compute_dtype="fp32")
    return TrainArgs(**{**values, **extra})


def losses(result) -> list[float]:
    return [point["loss"] for point in result.metrics["loss_curve"]]


# Every stage on every family (rm refuses MOSS: transformers has no scoring-head class for it)
FAMILY_RUNS = [(stage, family) for stage in STAGES + ["rm"] for family in FAMILIES
               if (stage, family) != ("rm", "moss")]


@pytest.mark.parametrize("stage, family", FAMILY_RUNS)
def test_every_stage_trains_every_family(tiny_model, files, tmp_path, family, stage, dtype_plan):
    """Four steps of the real TRL trainer, under each dtype plan: the loss starts where the stage's formula
    puts it with the adapter off as reference, and falls; the run folder says which stage trained it."""
    result = train(stage_args(stage, tiny_model(family), files, tmp_path / "run", model_type=family,
                              compute_dtype="auto"))
    curve = losses(result)
    assert all(math.isfinite(x) for x in curve)
    if stage in FIRST_LOSS:
        # bf16: policy and reference are two forward passes (adapter on, adapter off) whose bf16 roundings
        # differ; each answer token's log-probability (about 10 nats on the tiny models) is off by up to
        # 2^-8 of itself, and the pair's margin sums some 20 such tokens on both answers: about 0.3 nats,
        # which beta 0.1 turns into about 0.015 of loss around ln 2 (measured: up to 0.004)
        assert curve[0] == pytest.approx(FIRST_LOSS[stage], abs=1e-4 if dtype_plan == "fp32" else 2e-2)
    # KTO batches come in the data's order (two batches of 4 here): compare the loss on the same batch
    assert (curve[2] < curve[0] and curve[3] < curve[1]) if stage == "kto" else curve[-1] < curve[0], curve
    if stage == "rm":  # the scoring head is new: it is saved with the adapter
        from safetensors import safe_open

        with safe_open(tmp_path / "run" / "adapter_model.safetensors", "pt") as saved:
            assert any(".score." in key or key.startswith("score") or ".score" in key for key in saved.keys())
    card = RunCard.load(tmp_path / "run")
    assert (card.stage, card.peft_type, card.compute_dtype) == (stage, "lora", dtype_plan)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert not (tmp_path / "run" / "ref").exists()  # TRL's reference adapter copy was dropped, never saved


def stage_method_pairs() -> list[tuple[str, str]]:
    # grpo trains on prompts and rewards: tests/test_grpo.py runs its families and methods
    works = [(s, m) for s, row in stage_matrix().items() if s not in ("sft", "grpo") for m, why in row.items() if not why]
    if os.environ.get("UNIFT_ALL_STAGE_PAIRS"):
        return works
    # in CI: one method of each kind (weight deltas, quantized base, virtual tokens, rescaling, modules of
    # their own) with DPO, the ones that change the forward most with the reference-free stages; LoRA runs
    # every stage in test_every_stage_trains_every_family
    kinds = {"dpo": ("dora", "qlora", "prefix", "p-tuning", "ia3", "oft", "adapters", "full", "freeze"),
             "rm": ("prompt", "adalora", "qlora", "freeze"),
             "orpo": ("prefix", "adapters"), "simpo": ("prefix", "adapters"), "kto": ("ia3",)}
    return [(s, m) for s, m in works if m in kinds.get(s, ())]


@pytest.mark.parametrize("stage, method", stage_method_pairs())
def test_stage_by_method(tiny_model, files, tmp_path, stage, method, dtype_plan):
    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")
    rate = {"ia3": 5e-2, "vera": 5e-2, "prompt": 5e-2, "prefix": 3e-2}.get(method, 2e-2)
    result = train(stage_args(stage, tiny_model("llama"), files, tmp_path / "run", peft_type=method,
                              learning_rate=rate, max_steps=5, compute_dtype="auto"))
    curve = losses(result)
    assert all(math.isfinite(x) for x in curve) and min(curve[1:]) < curve[0], curve
    card = RunCard.load(tmp_path / "run")
    assert card.stage == stage
    # full and freeze have no adapter to switch off: their reference is a frozen copy, their folder the model
    assert (tmp_path / "run" / ("model.safetensors" if card.holds_model else "adapter_model.safetensors")).exists()


def test_reference_is_the_base_model_with_the_adapter_off(tiny_model, files, tmp_path):
    """No second copy: TRL's 'ref' adapter is gone and the reference log-probabilities are the base
    model's own (a prefix adapter changes the outputs from the start, so they must differ from the policy's)."""
    from unift.train import preference as stage_module

    seen = {}
    build = stage_module.preference_trainer

    def spy(*args, **kwargs):
        trainer = build(*args, **kwargs)
        seen["trainer"] = trainer
        return trainer

    stage_module.preference_trainer = spy
    try:
        train(stage_args("dpo", tiny_model("llama"), files, tmp_path / "run", peft_type="prefix", max_steps=1))
    finally:
        stage_module.preference_trainer = build
    trainer = seen["trainer"]
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    chosen, _ = trainer.compute_ref_log_probs(model, batch)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        logits = model.get_base_model()(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    base = (picked * mask[:, 1:]).sum(1)[:2]
    assert torch.allclose(chosen, base, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--stage", "dpo", "--simpo_gamma", "1"], "--simpo_gamma is not used by --stage dpo"),
    (["--stage", "kto", "--per_gpu_train_batch_size", "1"], "--stage kto needs --per_gpu_train_batch_size 2"),
    (["--stage", "dpo", "--peft_type", "adalora"], "--stage dpo does not work with --peft_type adalora"),
    (["--stage", "dpo", "--streaming", "--max_steps", "2"], "--stage dpo reads its data whole"),
    (["--stage", "ppo"], "unknown --stage 'ppo'"),
    (["--stage", "rm", "--model_type", "moss"], "--stage rm does not work with --model_type moss"),
    (["--stage", "rm", "--peft_type", "prefix"], "--stage rm does not work with --peft_type prefix"),
    (["--pref_loss", "bogus"], "--pref_loss"),
])
def test_bad_stage_flags_fail_before_anything_loads(capsys, flags, message):
    try:
        code = main(["train", *flags])
    except SystemExit as exit:  # argparse's own choices
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_unift_list_shows_stage_by_method(capsys):
    matrix = stage_matrix()
    assert set(matrix) == {"sft", "rm", "grpo", *STAGES}
    assert set(matrix["dpo"]) == set(method_names())
    assert "AdaLoRA allows one trainable adapter" in matrix["dpo"]["adalora"]
    assert main(["list"]) == 0
    assert stage_table() in capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index(README_START) + len(README_START)
    assert readme[start:readme.index(README_END)].strip("\n") == stage_table(), \
        "run: python -m unift.train.stages --update-readme"


def test_dpo_raises_held_out_preference_accuracy_on_the_embedded_model(tmp_path, capsys):
    """The end-to-end claim, on the bundled pairs (data/make_pairs.py): DPO with LoRA on the embedded model,
    from the command line, makes the model prefer the answer that follows the request on pairs about things
    it never saw in training (`unift eval --pairs`, base vs tuned)."""
    run = tmp_path / "run"
    assert main(["train", "--stage", "dpo", "--data", "caps_pairs", "--max_samples", "24", "--max_steps", "8",
                 "--per_gpu_train_batch_size", "4", "--learning_rate", "1e-3", "--warmup_ratio", "0",
                 "--output_dir", str(run)]) == 0
    assert main(["eval", "--adapter_dir", str(run), "--pairs", "caps_pairs_test", "--max_samples", "6",
                 "--compare_base"]) == 0
    results = json.loads((run / "eval_results.json").read_text())
    base, tuned = (row["tasks"]["caps_pairs_test"] for row in results["setups"])
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["margin"] > base["margin"] + 5
    assert tuned["examples"] == 6 and tuned["correct"] >= 5 and base["correct"] <= 1
    assert "caps_pairs_test: preference accuracy" in capsys.readouterr().out


def test_reward_model_scores_pairs_and_refuses_to_generate(tiny_model, files, tmp_path, capsys):
    """A reward model's run folder: eval --pairs reports its pairwise accuracy (how often the chosen answer
    scores higher); the commands that write text refuse it in one line."""
    run = tmp_path / "run"
    train(stage_args("rm", tiny_model("llama"), files, run, max_steps=6, learning_rate=1e-2))
    assert main(["eval", "--adapter_dir", str(run), "--pairs", str(files / "pairs.jsonl")]) == 0
    results = json.loads((run / "eval_results.json").read_text())
    [row] = results["setups"]
    task = row["tasks"][str(files / "pairs.jsonl")]
    assert task["examples"] == len(PAIRS) and task["preference_accuracy"] == 1.0 and task["reward_margin"] > 1
    assert "reward margin" in capsys.readouterr().out
    assert main(["generate", "--adapter_dir", str(run), "--prompt", "hi"]) == 2
    assert "is a reward model (--stage rm)" in capsys.readouterr().err
