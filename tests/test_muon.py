"""--optim muon (unift.train.muon): torch's Muon for the hidden layers' weight matrices, AdamW for the rest,
as one torch Optimizer.

A tiny random llama (2 decoder layers, from conftest) trains through the real `unift.train.train` under
full tuning and LoRA: the loss falls, and the Trainer's optimizer gives Muon exactly the decoder layers'
matrices (the LoRA A/B matrices under LoRA) and AdamW the embeddings, the head and the norms. A few steps of
MuonAdamW equal torch's Muon and AdamW stepped side by side, bit for bit, and so does a copy restored from its
state_dict. A run resumed from a checkpoint (the engine's optimizer.pt, or unift's engine-neutral state)
ends on the uninterrupted run's losses and weights. The refusals are one line."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from after_training_helpers import REPO, cli_result
from conftest import tiny_config, tiny_run_args
from transformers import AutoModelForCausalLM, Trainer

import unift.train.run as run_module
from unift.errors import UniftError
from unift.train.args import TrainArgs
from unift.train.muon import MUON, MuonAdamW, build_muon_adamw, split_parameters
from unift.train.plan import MIB
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
OUTSIDE = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}  # conftest: the head is untied


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(8)


def args_for(folder, data_file, out, **extra) -> TrainArgs:
    return tiny_run_args(folder, data_file, out, **{"optim": "muon", "weight_decay": 0.01, **extra})


def halves(optimizer, model) -> tuple[set[str], set[str]]:
    """(names Muon steps, names AdamW steps) in the Trainer's optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    assert isinstance(inner, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    found: tuple[set[str], set[str]] = (set(), set())
    for group in inner.param_groups:
        found[0 if group[MUON] else 1].update(names[id(p)] for p in group["params"])
    return found


class Watch:
    """The optimizer the Trainer built, the logged losses, and the memory estimate of the run."""

    def __init__(self, monkeypatch) -> None:
        from transformers import TrainerCallback

        self.optimizer = None
        self.losses: list[float] = []
        self.estimate = None
        watch = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kwargs):
                watch.optimizer = watch.optimizer or optimizer

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    watch.losses.append(logs["loss"])

        self.callback = Callback()
        check_memory = run_module.check_memory

        def spy(*args, **kwargs):
            found, batches = check_memory(*args, **kwargs)
            watch.estimate = found
            return found, batches

        monkeypatch.setattr(run_module, "check_memory", spy)


# ---- training through unift train -----------------------------------------------------------------------------

def test_full_tuning_gives_muon_the_decoder_matrices_and_adamw_the_rest(tiny_model, data_file, tmp_path, monkeypatch):
    watch = Watch(monkeypatch)
    result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="full"),
                   callbacks=[watch.callback])
    muon, adamw = halves(watch.optimizer, result.model)
    assert muon == {f"model.layers.{i}.{part}.weight" for i in (0, 1) for part in LINEAR}
    norms = {f"model.layers.{i}.{norm}.weight" for i in (0, 1) for norm in ("input_layernorm", "post_attention_layernorm")}
    assert adamw == OUTSIDE | norms
    inner = watch.optimizer.optimizer
    params = dict(result.model.named_parameters())
    for name in muon:  # Muon keeps one momentum buffer, AdamW two moments and a step count
        assert set(inner.state[params[name]]) == {"momentum_buffer"}, name
    for name in adamw:
        assert set(inner.state[params[name]]) == {"step", "exp_avg", "exp_avg_sq"}, name
    # AdamW's groups are the Trainer's: weight decay on the embeddings and the head, not on the norms
    names = {id(p): n for n, p in params.items()}
    decayed = {names[id(p)] for g in inner.param_groups if not g[MUON] and g["weight_decay"] for p in g["params"]}
    assert decayed == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(g["adjust_lr_fn"] == "match_rms_adamw" and g["weight_decay"] == 0.01 for g in inner.param_groups if g[MUON])
    assert len(watch.losses) == 4 and watch.losses[-1] < watch.losses[0] - 1, watch.losses
    # the plan counted one 4-byte buffer per Muon weight and two per AdamW weight
    count = {half: sum(params[n].numel() for n in names) for half, names in (("muon", muon), ("adamw", adamw))}
    assert watch.estimate.optimizer_mib * MIB == pytest.approx(4 * count["muon"] + 8 * count["adamw"])


def test_lora_gives_muon_the_adapter_matrices(tiny_model, data_file, tmp_path, monkeypatch, caplog):
    """LoRA on every linear layer (the default): each A and B matrix is Muon's; nothing is left for AdamW."""
    import logging

    watch = Watch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="unift"):
        result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="lora"),
                       callbacks=[watch.callback])
    muon, adamw = halves(watch.optimizer, result.model)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert muon == trained and not adamw
    assert len(muon) == 2 * len(LINEAR) * 2 and all(".lora_A." in n or ".lora_B." in n for n in muon)
    assert len(watch.losses) == 4 and watch.losses[-1] < watch.losses[0] - 0.5, watch.losses
    assert "--optim muon: Muon for 28 matrices (self_attn.q_proj.lora_A.default" in caplog.text
    assert "AdamW for 0 tensors (none)" in caplog.text


def test_lora_on_the_embeddings_and_head_leaves_those_to_adamw():
    """Which half a tensor goes to, without training: LoRA's matrices on the embeddings (lora_embedding_A/B)
    and on the head belong to those layers, not to the hidden layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 96, 0))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"]))
    matrices, others = (dict(half) for half in split_parameters(model))
    assert len(matrices) == 4 and all("q_proj.lora_" in n for n in matrices)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in others} == {"embed_tokens", "lm_head"}


# ---- the step against torch's own optimizers ------------------------------------------------------------------

def test_steps_equal_torch_muon_and_adamw_side_by_side_and_after_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 96, 0))
    twin = copy.deepcopy(model)
    settings = dict(lr=2e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    decayed = lambda m: Trainer.get_decay_parameter_names(None, m)  # noqa: E731 (the Trainer's own rule)
    mine = build_muon_adamw(model, decayed=decayed, **settings)
    matrices, others = split_parameters(twin)
    decay = set(decayed(twin))
    muon = torch.optim.Muon([p for _, p in matrices], lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [p for n, p in others if n in decay]},
                               {"params": [p for n, p in others if n not in decay], "weight_decay": 0.0}],
                              lr=2e-2, weight_decay=0.1)
    assert len(matrices) == 14 and {n for n, _ in others} >= OUTSIDE

    def step(optimizers, target, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in target.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    for seed in range(3):  # several steps: the momentum and AdamW's moments carry over
        step([mine], model, seed)
        step([muon, adamw], twin, seed)
        assert same(model, twin), seed
    # a copy restored from the state_dict (through torch.save, as a checkpoint's optimizer.pt) steps the same
    restored_model = copy.deepcopy(model)
    restored = build_muon_adamw(restored_model, decayed=decayed, **{**settings, "lr": 1.0})
    buffer = io.BytesIO()
    torch.save(mine.state_dict(), buffer)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert [g["lr"] for g in restored.param_groups] == [2e-2] * len(mine.param_groups)
    for seed in (3, 4):
        step([mine], model, seed)
        step([restored], restored_model, seed)
        step([muon, adamw], twin, seed)
        assert same(model, twin) and same(restored_model, twin), seed


# ---- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("peft_type", "neutral"), [("full", False), ("lora", False), ("lora", True)],
                         ids=["full", "lora", "lora-neutral"])
def test_a_resumed_run_continues_the_uninterrupted_one(tiny_model, data_file, tmp_path, peft_type, neutral):
    """4 steps, a checkpoint at step 2, resumed there: steps 3-4 have the same losses and the run ends on the
    same weights, bit for bit. `neutral`: the checkpoint says another engine wrote it (DDP, 1 process), so the
    resume loads unift's engine-neutral state (the optimizer state by parameter name) instead of optimizer.pt."""
    folder = tiny_model("llama")
    whole = train(args_for(folder, data_file, tmp_path / "whole", peft_type=peft_type, save_steps=2))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    checkpoint = resumed_dir / "checkpoint-2"
    (whole.output_dir / "checkpoint-2").rename(checkpoint)
    if neutral:
        card = json.loads((checkpoint / "unift_resume.json").read_text())
        assert card["state"], card  # LoRA's checkpoints hold the neutral state
        (checkpoint / "unift_resume.json").write_text(json.dumps({**card, "engine": "ddp"}))
    resumed = train(args_for(folder, data_file, resumed_dir, peft_type=peft_type, save_steps=2,
                             resume_from_checkpoint="latest"))
    if neutral:
        record = json.loads((resumed_dir / "unift_run.json").read_text())["scaling"]["resumed_from"]
        assert record["loaded"] == "engine-neutral state", record
    assert resumed.metrics["loss_curve"][2:] == whole.metrics["loss_curve"][2:]
    after = dict(resumed.model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in whole.model.named_parameters() if p.requires_grad)


# ---- refusals -------------------------------------------------------------------------------------------------

def test_optim_args_are_refused_before_anything_loads(tmp_path, capsys):
    code, _, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), "--optim", "muon",
                               "--optim_args", "momentum=0.9"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "--optim_args momentum: not read by --optim muon" in last and "never-loaded" not in err, err


def test_a_torch_without_muon_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    code, _, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), "--optim", "muon"],
                              capsys)
    assert code == 2 and "--optim muon needs torch.optim.Muon" in err.strip().splitlines()[-1], err


def test_deepspeed_and_fsdp_are_refused_before_loading(data_file, tmp_path, monkeypatch):
    from unift.train.scaling import decide_scaling

    with pytest.raises(UniftError, match="--optim muon under DeepSpeed is not supported"):
        train(args_for(tmp_path / "never-loaded", data_file, tmp_path / "run",
                       deepspeed=str(REPO / "configs/deepspeed/zero2.json")))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UniftError, match="--optim muon under FSDP is not supported"):
        decide_scaling(TrainArgs(optim="muon"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: DDP, where every process steps whole matrices
    assert decide_scaling(TrainArgs(optim="muon")).engine == "ddp"


@pytest.mark.parametrize("peft_type", ["ia3", "vera", "prefix", "prompt"])
def test_a_method_without_weight_matrices_is_one_line_before_anything_loads(peft_type, tmp_path, capsys):
    """IA3 and VeRA train scaling vectors, prefix and prompt tuning embeddings: nothing Muon steps."""
    code, out, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), "--optim", "muon",
                                 "--peft_type", peft_type], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"--optim muon steps weight matrices, and --peft_type {peft_type} trains none" in err, err


def test_every_methods_trains_matrices_fact_is_what_muon_finds(tiny_model):
    """MethodSpec.trains_matrices, checked when the arguments are built, against the split Muon makes of each
    method's wrapped tiny llama (a method that trains a matrix somewhere has it stepped by Muon)."""
    from unift.models import get_model_spec, load_tokenizer
    from unift.peft.registry import get_method, method_names, wrap_model

    folder = tiny_model("llama")
    tokenizer = load_tokenizer(str(folder))
    for name in method_names():
        method = get_method(name)
        if method.quantization_bit:  # qlora: LoRA's layers over a 4-bit base
            continue
        model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), tokenizer.pad_token_id))
        options = TrainArgs(peft_type=name)
        options.total_steps = 10  # AdaLoRA schedules its rank budget over the run's steps
        wrapped = wrap_model(model, method, options, get_model_spec("llama"))
        matrices, _ = split_parameters(wrapped)
        assert bool(matrices) == method.trains_matrices, (name, [n for n, _ in matrices][:3])


def test_the_optimizer_still_refuses_a_model_without_weight_matrices(tiny_model, data_file, tmp_path, monkeypatch):
    """The builder's own check, for whatever reaches it without a method's word (here IA3 let past the
    argument check): it names what the model trains."""
    import dataclasses

    from unift.peft import registry

    monkeypatch.setitem(registry.METHODS, "ia3", dataclasses.replace(registry.METHODS["ia3"], trains_matrices=True))
    with pytest.raises(UniftError, match=r"--optim muon: .* trains no weight matrix of its hidden layers \(it "
                                         r"trains .*ia3_l"):
        train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="ia3"))
