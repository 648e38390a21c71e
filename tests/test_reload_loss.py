"""A reloaded adapter reproduces the loss training measured, for every method: the Trainer's own
evaluation (the training forward, on the held-out batch, after the last step) equals the loss that
`unift eval` computes on the same rows with the run folder reloaded in the base dtype it was trained in."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import memorisation_rows

from unift.evals.likelihood import score_rows
from unift.inference.generator import Generator
from unift.models.dtypes import torch_dtype
from unift.models.runcard import RunCard
from unift.peft import METHODS, get_method
from unift.train.args import TrainArgs
from unift.train.run import prepare, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEARNING_RATE = {"ia3": 5e-2, "vera": 5e-2, "prompt": 5e-2, "prefix": 3e-2, "adalora": 3e-2}


def orthogonality_penalty(model) -> float:
    """AdaLoRA's regulariser as PEFT adds it: weight x mean over A and B of ||AA^T - I||_F (||B^T B - I||_F)."""
    weight = model.peft_config["default"].orth_reg_weight
    norms = []
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(float(torch.linalg.matrix_norm(cov.float() - torch.eye(len(cov)))))
    return weight * sum(norms) / len(norms)


@pytest.mark.parametrize("peft_type", sorted(METHODS))
def test_reloaded_adapter_reproduces_the_training_loss(tiny_model, write_jsonl, tmp_path, peft_type, dtype_plan):
    data = write_jsonl(memorisation_rows(12))
    method = get_method(peft_type)
    args = TrainArgs(
        model_name_or_path=str(tiny_model("llama")), peft_type=peft_type, data=[str(data)],
        output_dir=str(tmp_path / "run"), max_steps=3, save_steps=3, val_set_size=4, per_gpu_train_batch_size=4,
        cutoff_len=64, learning_rate=LEARNING_RATE.get(peft_type, 1e-2), warmup_ratio=0.0,
        lr_scheduler_type="constant", logging_steps=1, report_to="none",
        compute_dtype="auto",  # the plan the test forces, as users get it
    )
    result = train(args)
    trained = result.metrics["eval_loss"][-1]
    assert trained["step"] == 3  # measured after the last optimizer step, as the adapter was saved

    val = prepare(args).val  # the same 4 held-out rows (same seed), one evaluation batch
    rows = [(r["input_ids"], r["labels"]) for r in val]
    card = RunCard.load(result.output_dir)
    assert card.compute_dtype == dtype_plan
    generator = Generator.load(str(result.output_dir), dtype=torch_dtype(card.base_dtype))
    scored = score_rows(generator.model, rows, generator.tokenizer.pad_token_id, batch_size=4)
    reloaded = sum(s.nll for s in scored) / sum(s.tokens for s in scored)  # token mean, as the Trainer's loss
    if peft_type == "adalora":
        # PEFT adds its orthogonality penalty to every loss, evaluation's too. It is a function of the
        # training-time matrices (full initial rank, pruned rows masked): the reload keeps only the ranks
        # the budget left (same outputs, other shapes, another penalty), so it comes from the trained model.
        reloaded += orthogonality_penalty(result.model)
    # bf16 bases: the Trainer evaluates under autocast, the reload runs bf16 weights directly
    tolerance = 2e-2 if card.base_dtype == "bf16" else 1e-4
    assert math.isclose(reloaded, trained["loss"], rel_tol=tolerance), (reloaded, trained["loss"])
    if method.holds_model:  # full, freeze: no adapter to switch off, the base is the untouched checkpoint
        original = Generator.load(None, base_model=str(tiny_model("llama")), dtype=torch_dtype(card.base_dtype))
        base = score_rows(original.model, rows, generator.tokenizer.pad_token_id, batch_size=4)
    else:
        with generator.adapter_enabled(False):
            base = score_rows(generator.model, rows, generator.tokenizer.pad_token_id, batch_size=4)
    assert sum(s.nll for s in base) != pytest.approx(sum(s.nll for s in scored), rel=1e-3)  # the adapter acts

