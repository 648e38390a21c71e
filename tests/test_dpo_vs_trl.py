"""unift's --stage dpo is TRL's DPOTrainer: with the same LoRA start and the same batches, `unift train --stage
dpo` with its defaults and plain TRL with its own defaults take the same steps (learning rate, loss) and
end with the same adapter. This pins everything between them at once: the tokenization of the pairs,
the answer-only masks, the reference (the base with the adapter off), the loss inputs, unift's speed
levers, the schedule and the saved weights (bench/dpo_vs_trl.py measures the same on the embedded model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unift.train.args import TrainArgs
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [json.loads(line) for line in
        (Path(__file__).resolve().parents[1] / "data" / "arith_pairs" / "train.jsonl").read_text().splitlines()[:16]]
STEPS, BATCH, LR, SEED = 4, 4, 1e-2, 42


def _key(name: str) -> str:
    return name.replace(".default", "")


def _unift(folder: Path, data: Path, out: Path) -> dict:
    """unift's run with its defaults: the losses and learning rates of every step, its rows in the order it
    trained them, its LoRA weights before the first step and the adapter it saved."""
    from transformers import TrainerCallback

    from unift.train import preference

    seen: dict = {}

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["start"] = {_key(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    build = preference.preference_trainer

    def spy(*args, **kwargs):
        seen["trainer"] = build(*args, **kwargs)
        return seen["trainer"]

    preference.preference_trainer = spy
    try:
        train(TrainArgs(stage="dpo", model_name_or_path=str(folder), data=[str(data)], output_dir=str(out),
                        max_steps=STEPS, per_gpu_train_batch_size=BATCH, learning_rate=LR, seed=SEED,
                        logging_steps=1, save_steps=1000, compute_dtype="fp32"), callbacks=[Start()])
    finally:
        preference.preference_trainer = build
    trainer = seen["trainer"]
    from safetensors.torch import load_file

    return {"log": [(h["learning_rate"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
            "rows": [(r["prompt_ids"], r["chosen_ids"]) for r in trainer.train_dataset], "start": seen["start"],
            "saved": {_key(k): v for k, v in load_file(out / "adapter_model.safetensors").items()}}


def _trl(folder: Path, unift: dict, out: Path) -> dict:
    """Plain TRL with its DPOConfig defaults, from unift's LoRA start, its rows in unift's order (the two
    samplers, seeded alike, then draw the same batches)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(unift["start"][_key(name)])
    config = DPOConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                       beta=0.1, seed=SEED, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                       logging_steps=1, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(folder))
    position = {(tuple(p), tuple(c)): i for i, (p, c) in enumerate(unift["rows"])}
    rows = [(tuple(r["prompt_ids"]), tuple(r["chosen_ids"])) for r in trainer.train_dataset]
    assert sorted(position) == sorted(rows)  # the same token ids: unift's rendering is the chat template's
    trainer.train_dataset = trainer.train_dataset.select(sorted(range(len(rows)), key=lambda i: position[rows[i]]))
    trainer.train()
    return {"log": [(h["learning_rate"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
            "saved": {_key(k): v for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}}


def test_dpo_stage_takes_trls_steps_with_both_defaults(tiny_model, tmp_path):
    folder = tiny_model("llama")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    mine = _unift(folder, data, tmp_path / "unift")
    theirs = _trl(folder, mine, tmp_path / "trl")
    assert [lr for lr, _ in mine["log"]] == pytest.approx([lr for lr, _ in theirs["log"]], rel=1e-6), \
        "the DPO stage's default schedule is not DPOConfig's"
    assert [loss for _, loss in mine["log"]] == pytest.approx([loss for _, loss in theirs["log"]], abs=1e-4)
    assert mine["saved"].keys() == theirs["saved"].keys()
    for name, weight in theirs["saved"].items():
        torch.testing.assert_close(mine["saved"][name], weight, atol=1e-5, rtol=1e-4)
