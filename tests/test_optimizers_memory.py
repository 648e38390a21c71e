"""The optimizers that save memory in full tuning: GaLore and APOLLO (transformers' galore_*/apollo_* with
--optim_target_modules) and BAdam (unift's --optim badam, the badam package's BlockOptimizer).

Each trains a tiny random llama (2 decoder layers, from conftest) a few steps through the real
`unift.train.train`: the loss falls, the optimizer state is low-rank where it should be, and the weights
move where the optimizer says they do. The refusals are one line before anything loads."""

from __future__ import annotations

import logging

import pytest
import torch
from after_training_helpers import REPO, cli_result
from conftest import tiny_run_args
from transformers import AutoModelForCausalLM, TrainerCallback

from unift.errors import UniftError
from unift.train.args import TrainArgs
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK = 4  # the tiny model's matrices are 32-128 wide: a rank-4 state is visibly smaller than the full one
PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(8)


def args_for(folder, data_file, out, **extra) -> TrainArgs:
    return tiny_run_args(folder, data_file, out, **{"peft_type": "full", **extra})


def moved(folder, model) -> set[str]:
    """Names of the parameters that differ from the base's, bit for bit."""
    before = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name].detach())}


class Watch(TrainerCallback):
    """The optimizer the Trainer built, and the logged losses."""

    def __init__(self) -> None:
        self.optimizer = None
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = self.optimizer or optimizer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def states_by_name(optimizers, model) -> dict[str, dict]:
    """parameter name -> its optimizer state, over one optimizer or transformers' per-parameter ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: s for opt in optimizers for p, s in opt.state.items() if s}


# ---- GaLore, APOLLO -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("optim", "cls"), [
    ("galore_adamw", "galore_torch.adamw.AdamW"),
    ("apollo_adamw", "apollo_torch.apollo.AdamW"),
    ("galore_adamw_layerwise", "transformers.trainer_pt_utils.LayerWiseDummyOptimizer"),
])
def test_low_rank_optimizers_train_with_low_rank_state(tiny_model, data_file, tmp_path, optim, cls):
    folder, watch = tiny_model("llama"), Watch()
    result = train(args_for(folder, data_file, tmp_path / "run", optim=optim, optim_args=f"rank={RANK}"),
                   callbacks=[watch])
    inner = getattr(watch.optimizer, "optimizer", watch.optimizer)  # accelerate wraps it
    assert f"{type(inner).__module__}.{type(inner).__name__}" == cls
    # layerwise: one optimizer per parameter, stepped in the backward pass; the dummy holds none itself
    optimizers = list(inner.optimizer_dict.values()) if hasattr(inner, "optimizer_dict") else [inner]
    states = states_by_name(optimizers, result.model)
    projected = {n for n in states if n.rsplit(".", 2)[-2] in PROJECTED}
    assert len(projected) == 2 * len(PROJECTED)  # the default: every linear layer of both decoder layers
    for name, state in states.items():
        full = tuple(dict(result.model.named_parameters())[name].shape)
        if name in projected:  # the moments live in the rank-4 space, next to the projector that maps them
            assert "projector" in state and RANK in state["exp_avg"].shape and state["exp_avg"].shape != full, name
        else:  # embeddings, norms and the head: plain AdamW, full-size moments
            assert "projector" not in state and tuple(state["exp_avg"].shape) == full, name
    assert moved(folder, result.model) == {n for n, _ in result.model.named_parameters()}
    assert len(watch.losses) == 4 and watch.losses[-1] < watch.losses[0] - 1, watch.losses
    assert result.metrics["loss_curve"][-1]["loss"] == watch.losses[-1]


def test_optim_target_modules_picks_the_projected_layers(tiny_model, data_file, tmp_path):
    """Two names, given as a --config file may hold them: one string, comma-separated."""
    watch = Watch()
    result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", optim="galore_adamw",
                            optim_args=f"rank={RANK},update_proj_gap=2", optim_target_modules="q_proj, down_proj"),
                   callbacks=[watch])
    states = states_by_name([watch.optimizer.optimizer], result.model)
    assert {n for n, s in states.items() if "projector" in s} == {
        f"model.layers.{i}.{part}.weight" for i in (0, 1) for part in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(s["projector"].rank == RANK for s in states.values() if "projector" in s)  # --optim_args reached it


def test_galore_under_freeze_projects_and_moves_the_trained_layer_only(tiny_model, data_file, tmp_path):
    folder = tiny_model("llama")
    result = train(args_for(folder, data_file, tmp_path / "run", peft_type="freeze", freeze_trainable_layers=1,
                            optim="galore_adamw", optim_args=f"rank={RANK}"))
    changed = moved(folder, result.model)
    assert changed and all(name.startswith("model.layers.1.") for name in changed), changed


def test_a_target_that_matches_no_linear_layer_is_one_line(tiny_model, data_file, tmp_path):
    with pytest.raises(UniftError, match=r"--optim_target_modules q_projx: matches no linear layer .*q_proj, k_proj"):
        train(args_for(tiny_model("llama"), data_file, tmp_path / "run", optim="galore_adamw",
                       optim_target_modules=["q_proj", "q_projx"]))


# ---- BAdam ------------------------------------------------------------------------------------------------

def test_badam_trains_one_block_at_a_time(tiny_model, data_file, tmp_path, caplog):
    """Descending (the default) starts with the last decoder layer; with 100 steps per block, 4 steps move
    that layer and nothing else. The embeddings, the final norm and the head never train."""
    folder, watch = tiny_model("llama"), Watch()
    with caplog.at_level(logging.INFO, logger="unift"):
        result = train(args_for(folder, data_file, tmp_path / "run", optim="badam", badam_switch_every=100),
                       callbacks=[watch])
    block = {n for n, _ in result.model.named_parameters() if n.startswith("model.layers.1.")}
    assert moved(folder, result.model) == block
    inner = watch.optimizer.optimizer
    assert type(inner).__name__ == "BlockAdam" and isinstance(inner.base_optimizer, torch.optim.AdamW)
    # AdamW state for the active block only: 9 tensors of one layer, not the 21 of the model
    assert sum(1 for s in inner.base_optimizer.state.values() if s) == len(block)
    assert watch.losses[-1] < watch.losses[0] - 1, watch.losses
    assert "badam: model.layers.1 trains (block 2 of 2, descending order, 100 steps each)" in caplog.text


def test_badam_switches_blocks_every_n_steps_and_resumes_in_its_block(tiny_model, data_file, tmp_path, caplog):
    """Ascending, 2 steps per block, 4 steps: layer 0 trains steps 1-2, layer 1 steps 3-4. A run resumed
    from the checkpoint of step 3 (mid-block, AdamW state saved) ends with the same weights, bit for bit."""
    folder = tiny_model("llama")
    settings = dict(optim="badam", badam_switch_every=2, badam_switch_mode="ascending", save_steps=3)
    with caplog.at_level(logging.INFO, logger="unift"):
        whole = train(args_for(folder, data_file, tmp_path / "whole", **settings))
    assert moved(folder, whole.model) == {n for n, _ in whole.model.named_parameters() if n.startswith("model.layers.")}
    assert "badam: model.layers.1 trains after step 2" in caplog.text
    assert "badam: model.layers.0 trains after step 4" in caplog.text
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (whole.output_dir / "checkpoint-3").rename(resumed_dir / "checkpoint-3")
    resumed = train(args_for(folder, data_file, resumed_dir, resume_from_checkpoint="latest", **settings))
    after = dict(resumed.model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in whole.model.named_parameters())


# ---- refusals: one line, before anything loads ------------------------------------------------------------

FULL = ["--peft_type", "full"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--optim_target_modules", "q_proj"], "--optim_target_modules is read by the galore_* and apollo_* optimizers"),
    (["--optim", "adamw_torch", "--badam_switch_every", "5"], "--badam_switch_every: read by --optim badam only"),
    (["--optim", "galore_adamw"], "it needs --peft_type full or freeze, not lora"),
    (["--optim", "apollo_adamw", "--peft_type", "qlora"], "it needs --peft_type full or freeze, not qlora"),
    (["--optim", "galore_adamw_layerwise", *FULL, "--gradient_accumulation_steps", "2"],
     "so gradients cannot accumulate: use --gradient_accumulation_steps 1, or --optim galore_adamw"),
    (["--optim", "galore_adamw", *FULL, "--weight_decay", "0.1"], "--weight_decay is not passed to --optim galore_adamw"),
    (["--optim", "galore_adamw", *FULL, "--optim_args", "rank=64,momentum=0.9"], "--optim_args momentum: not read"),
    (["--optim", "galore_adamw", *FULL, "--optim_args", "rank=big"], "--optim_args rank=big: not an integer"),
    (["--optim", "apollo_adamw", *FULL, "--optim_args", "proj=gaussian"], "--optim_args proj=gaussian: not one of"),
    (["--optim", "badam", "--peft_type", "freeze"], "--optim badam chooses which decoder layers train"),
    (["--optim", "badam"], "it needs --peft_type full, not lora"),
    (["--optim", "badam", *FULL, "--badam_switch_mode", "sideways"], "--badam_switch_mode"),
])
def test_bad_combinations_fail_before_anything_loads(tmp_path, capsys, argv, message):
    # a model folder that does not exist: an error about it would mean the check came too late
    code, _, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), *argv], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and message in last and "never-loaded" not in err and "Traceback" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="galore_adamw_8bit runs where CUDA is")
def test_galore_8bit_needs_cuda(tmp_path, capsys):
    code, _, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), "--optim",
                               "galore_adamw_8bit", *FULL], capsys)
    assert code == 2 and "needs a CUDA GPU" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize(("optim", "message"), [
    ("galore_adamw", "--optim galore_adamw under DeepSpeed is not supported"),
    ("badam", "--optim badam runs in one process without DeepSpeed"),
])
def test_engines_that_cannot_run_them_are_refused_before_loading(tiny_model, data_file, tmp_path, optim, message):
    with pytest.raises(UniftError, match=message):
        train(args_for(tmp_path / "never-loaded", data_file, tmp_path / "run", optim=optim,
                       deepspeed=str(REPO / "configs/deepspeed/zero2.json")))


def test_layerwise_and_badam_are_refused_across_processes(monkeypatch):
    from unift.train.scaling import decide_scaling

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: DDP
    for optim, message in (("galore_adamw_layerwise", "which transformers does not support across processes"),
                           ("badam", "runs in one process")):
        with pytest.raises(UniftError, match=message):
            decide_scaling(TrainArgs(peft_type="full", optim=optim))
    assert decide_scaling(TrainArgs(peft_type="full", optim="galore_adamw")).engine == "ddp"  # measured: ranks stay equal under DDP
