"""--peft_type full and freeze (the model's own weights train; the run folder holds the trained model), the
optimizers of --optim, NEFTune, and the training flags whose values are checked before anything loads.

Every run trains a tiny random model a few steps through the real `unift.train.train`; weights are
compared tensor by tensor with the base they started from."""

from __future__ import annotations

import json

import pytest
import torch
from after_training_helpers import cli_result
from conftest import tiny_run_args
from transformers import AutoModelForCausalLM, TrainerCallback

from unift.errors import UniftError
from unift.inference.generator import Generator
from unift.models.runcard import RunCard
from unift.train.args import TrainArgs
from unift.train.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])
# where each family keeps its decoder layers
STACK = {"llama": "model.layers.", "bloom": "transformer.h."}


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(8)


def args_for(folder, data_file, out, **extra) -> TrainArgs:
    return tiny_run_args(folder, data_file, out, **{"max_steps": 2, **extra})


def base_weights(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    """name -> whether the trained tensor differs from the base's (bit for bit)."""
    return {name: not torch.equal(p.detach().float(), before[name]) for name, p in model.named_parameters()}


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


# ---- full and freeze: what trains, and the run folder ---------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_full_trains_every_weight_and_the_run_folder_is_the_model(tiny_model, data_file, tmp_path, model_type,
                                                                  dtype_plan):
    folder = tiny_model(model_type)
    before = base_weights(folder)
    result = train(args_for(folder, data_file, tmp_path / "run", model_type=model_type, peft_type="full",
                            compute_dtype="auto"))
    moved = changed(result.model, before)
    assert all(moved.values()), [name for name, m in moved.items() if not m]
    assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"] == sum(
        t.numel() for t in before.values())
    run = result.output_dir
    assert (run / "model.safetensors").is_file() and not (run / "adapter_config.json").exists()
    card = RunCard.load(run)
    # the trained weights stay fp32 under either plan (the optimizer's master copy); bf16 only computes
    assert card.holds_model and card.peft_type == "full" and card.base_dtype == "fp32"
    assert card.compute_dtype == dtype_plan
    generator = Generator.load(str(run))
    assert generator.holds_model and not generator.has_adapter
    assert torch.allclose(logits(generator.model), logits(result.model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_freeze_trains_the_last_layer_only(tiny_model, data_file, tmp_path, model_type, dtype_plan):
    folder = tiny_model(model_type)
    before = base_weights(folder)
    result = train(args_for(folder, data_file, tmp_path / "run", model_type=model_type, peft_type="freeze",
                            freeze_trainable_layers=1, save_steps=1, compute_dtype="auto"))
    last = f"{STACK[model_type]}1."  # the tiny models have 2 layers
    moved = changed(result.model, before)
    assert all(m for name, m in moved.items() if name.startswith(last))
    assert not any(m for name, m in moved.items() if not name.startswith(last)), \
        [name for name, m in moved.items() if m and not name.startswith(last)]
    assert result.metrics["trainable_parameters"] == sum(t.numel() for n, t in before.items() if n.startswith(last))
    # the run folder and the last checkpoint (written during training) both load as the trained model
    trained = logits(result.model)
    for where in (result.output_dir, result.output_dir / "checkpoint-2"):
        assert RunCard.load(where).holds_model
        assert torch.allclose(logits(Generator.load(str(where)).model), trained, atol=1e-5, rtol=1e-5)


def test_freeze_first_layers_some_modules_and_extra_modules(tiny_model, data_file, tmp_path):
    """A negative N counts from the first layer; the modules are chosen by name part (`mlp`); extra modules
    outside the layers (`embed_tokens`, given comma-separated) train too."""
    folder = tiny_model("llama")
    before = base_weights(folder)
    result = train(args_for(folder, data_file, tmp_path / "run", peft_type="freeze", freeze_trainable_layers=-1,
                            freeze_trainable_modules=["mlp"], freeze_extra_modules=["embed_tokens,norm"]))
    moved = {name for name, m in changed(result.model, before).items() if m}
    assert moved == {n for n in before if n.startswith("model.layers.0.mlp.")} | {
        "model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize(("extra", "message"), [
    ({"freeze_trainable_modules": ["mlp", "attn_typo"]}, "--freeze_trainable_modules: attn_typo matches no module"),
    ({"freeze_extra_modules": ["wte"]}, "--freeze_extra_modules: wte matches no module"),
    ({"freeze_trainable_layers": 3}, "--freeze_trainable_layers 3: the model has 2 decoder layers"),
])
def test_freeze_names_that_match_nothing_are_errors(tiny_model, data_file, tmp_path, extra, message):
    with pytest.raises(UniftError, match=message):
        train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="freeze", **extra))


@pytest.mark.parametrize("peft_type", ["full", "freeze"])
def test_quantized_loading_is_refused(peft_type):
    with pytest.raises(UniftError, match=f"--peft_type {peft_type} trains the model's own weights, and 4-bit"):
        TrainArgs(peft_type=peft_type, quantization_bit=4)
    with pytest.raises(UniftError, match="8-bit weights cannot be trained directly"):
        TrainArgs(peft_type=peft_type, load_in_8bit=True)


# ---- after training: generate, predict, eval, merge on a full run folder ----------------------------------

def test_after_training_commands_load_the_run_folder(tiny_model, data_file, tmp_path, capsys, dtype_plan):
    folder = tiny_model("llama")
    result = train(args_for(folder, data_file, tmp_path / "run", peft_type="freeze", compute_dtype="auto"))
    assert RunCard.load(result.output_dir).compute_dtype == dtype_plan
    run = str(result.output_dir)
    trained = logits(result.model)

    code, out, _ = cli_result(["generate", "--adapter_dir", run, "--prompt", "What is the code word number 3?",
                               "--max_new_tokens", "4"], capsys)
    assert code == 0 and out.strip()
    code, _, _ = cli_result(["predict", "--adapter_dir", run, "--data", str(data_file), "--max_new_tokens", "4",
                             "--result_dir", str(tmp_path / "preds")], capsys)
    rows = [json.loads(line) for line in (tmp_path / "preds" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and len(rows) == 8

    code, _, _ = cli_result(["eval", "--adapter_dir", run, "--data", str(data_file), "--metrics", "ppl",
                             "--show", "0", "--output", str(tmp_path / "eval.json")], capsys)
    document = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and [row["label"] for row in document["setups"]] == ["tuned"]
    code, _, err = cli_result(["eval", "--adapter_dir", run, "--data", str(data_file), "--compare_base"], capsys)
    assert code == 2 and "does not hold" in err.strip().splitlines()[-1]
    # a full run folder is not an adapter to put over another base
    code, _, err = cli_result(["generate", "--adapter_dir", run, "--model_name_or_path", str(tiny_model("bloom")),
                               "--prompt", "Hi"], capsys)
    assert code == 2 and "holds the whole trained model" in err

    # the web service offers the tuned model alone: no ":base" id, as there is no adapter to switch off
    from starlette.testclient import TestClient

    from unift.inference.settings import PRESETS
    from unift.serve.app import create_app

    generator = Generator.load(run)
    with TestClient(create_app(generator, PRESETS["chat"], ui=False)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [generator.name]
        answer = client.post("/v1/chat/completions", json={
            "model": generator.name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1

    merged = tmp_path / "merged"
    code, _, err = cli_result(["merge", "--adapter_dir", run, "--merged_dir", str(merged)], capsys)
    assert code == 0 and "nothing to fold in, writing it as it is" in err
    card = json.loads((merged / "unift_merged.json").read_text())
    assert card["peft_type"] == "freeze" and card["probe_max_abs_logit_diff"] == 0.0
    as_merged = Generator.load(base_model=str(merged))
    assert torch.allclose(logits(as_merged.model), trained, atol=1e-5, rtol=1e-5)


def test_terminal_chat_says_a_whole_model_has_no_base(monkeypatch):
    import io

    from test_chat import EchoGenerator, FakeTTY

    from unift.inference.chat import chat_loop
    from unift.inference.settings import GenerationSettings

    class WholeModel(EchoGenerator):
        has_adapter, holds_model = False, True

    lines = iter(["/base", "hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    generator, out = WholeModel(), io.StringIO()
    chat_loop(generator, GenerationSettings(), system=None, stdin=FakeTTY(), out=out)
    assert "holds the whole fine-tuned model: there is no adapter to switch off" in out.getvalue()
    assert [adapter for _, adapter in generator.seen] == [True]  # still the tuned model


def test_full_and_freeze_are_in_the_support_table():
    from unift.peft.support import support_table

    table = support_table()
    assert "| full |" in table and "| freeze |" in table and "`--freeze_trainable_layers`" in table


# ---- --optim ----------------------------------------------------------------------------------------------

class Watch(TrainerCallback):
    """The optimizer the Trainer built, and the first step's loss."""

    def __init__(self) -> None:
        self.optimizer = None
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = self.optimizer or optimizer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize(("optim", "optim_args", "expected"), [
    ("adamw_torch", None, "torch.optim.adamw.AdamW"),
    ("adamw_torch_fused", None, "torch.optim.adamw.AdamW"),
    ("adafactor", None, "transformers.optimization.Adafactor"),
    ("sgd", "momentum=0.9", "torch.optim.sgd.SGD"),
    ("adamw_8bit", None, "bitsandbytes.optim.adamw.AdamW"),
    ("paged_adamw_8bit", None, "bitsandbytes.optim.adamw.AdamW"),
    ("paged_adamw_32bit", None, "bitsandbytes.optim.adamw.AdamW"),
])
def test_optimizers_train(tiny_model, data_file, tmp_path, optim, optim_args, expected):
    watch = Watch()
    # full: tensors large enough for bitsandbytes' 8-bit states (a tiny model's LoRA matrices are not)
    result = train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="full", optim=optim,
                            optim_args=optim_args), callbacks=[watch])
    inner = getattr(watch.optimizer, "optimizer", watch.optimizer)  # accelerate wraps it
    assert f"{type(inner).__module__}.{type(inner).__name__}" == expected
    if optim == "adamw_torch_fused":
        assert inner.param_groups[0]["fused"]
    if optim == "sgd":
        assert inner.param_groups[0]["momentum"] == 0.9  # --optim_args reached it
    if "8bit" in optim:  # 8-bit states for the tensors large enough for them (bitsandbytes: >= 4096 values)
        states = [s for s in inner.state.values() if "state1" in s]
        assert any(s["state1"].dtype == torch.uint8 for s in states)
    assert len(watch.losses) == 2 and all(loss == loss for loss in watch.losses)
    assert json.loads((result.output_dir / "unift_run.json").read_text())["arguments"]["optim"] == optim


def test_qlora_default_optimizer_is_kept_without_optim():
    from unift.peft import get_method
    from unift.train.optim import default_optimizer

    args = TrainArgs(peft_type="qlora")
    assert args.optim is None
    wanted = "paged_adamw_32bit" if torch.cuda.is_available() else default_optimizer()
    assert get_method("qlora").optimizer_name() == wanted


# ---- NEFTune --------------------------------------------------------------------------------------------

class EmbeddingProbe(TrainerCallback):
    """At the first step: the embedding layer's output in training mode and in evaluation mode, against the
    plain lookup of its weight."""

    def __init__(self) -> None:
        self.noisy: bool | None = None
        self.noisy_in_eval: bool | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.noisy is not None:
            return
        embed = model.get_input_embeddings()
        plain, mode = embed.weight[IDS].detach(), embed.training
        with torch.no_grad():
            self.noisy = not torch.equal(embed.train()(IDS), plain)
            self.noisy_in_eval = not torch.equal(embed.eval()(IDS), plain)
        embed.train(mode)


def test_neftune_perturbs_the_embeddings_while_training_only(tiny_model, data_file, tmp_path):
    folder = tiny_model("llama")
    runs = {}
    for alpha in (None, 5.0):
        probe, watch = EmbeddingProbe(), Watch()
        result = train(args_for(folder, data_file, tmp_path / f"run-{alpha}", neftune_noise_alpha=alpha, max_steps=1),
                       callbacks=[probe, watch])
        runs[alpha] = (probe, watch, result)
    (plain_probe, plain_watch, _), (noisy_probe, noisy_watch, noisy) = runs[None], runs[5.0]
    assert (plain_probe.noisy, noisy_probe.noisy, noisy_probe.noisy_in_eval) == (False, True, False)
    assert plain_watch.losses[0] != noisy_watch.losses[0]  # same seed, same batch: the noise changed the loss
    # after training the hook is gone: the embeddings are the plain lookup even in training mode
    embed = noisy.model.get_input_embeddings().train()
    with torch.no_grad():
        assert torch.equal(embed(IDS), embed.weight[IDS])
    assert "padding_free" not in noisy.metrics["optimizations"]  # NEFTune's noise scale assumes one example a row
    assert "padding_free" in runs[None][2].metrics["optimizations"]


# ---- choice-valued flags fail at parse time, naming the flag -------------------------------------------------

@pytest.mark.parametrize(("argv", "flag"), [
    (["--lr_scheduler_type", "cosine_typo"], "--lr_scheduler_type"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type"),
    (["--optim", "adamw_typo"], "--optim"),
    (["--optim", "lomo"], "--optim lomo needs the lomo-optim package"),
    (["--optim", "schedule_free_adamw"], "--optim schedule_free_adamw needs the schedulefree package"),
    (["--optim_args", "momentum"], "--optim_args"),
    (["--optim", "adamw_torch", "--optim_args", "momentum=0.9"], "--optim_args momentum: not read by --optim"),
    (["--report_to", "mlflow"], "--report_to"),
    (["--neftune_noise_alpha", "0"], "--neftune_noise_alpha must be > 0"),
    (["--neftune_noise_alpha", "5", "--padding_free", "true"], "--neftune_noise_alpha"),
    (["--peft_type", "freeze", "--freeze_trainable_layers", "0"], "--freeze_trainable_layers"),
    (["--peft_type", "lora", "--freeze_trainable_layers", "1"], "--freeze_trainable_layers is not used by"),
])
def test_bad_training_values_fail_before_anything_loads(tmp_path, capsys, argv, flag):
    # a model folder that does not exist: an error about it would mean the check came too late
    code, _, err = cli_result(["train", "--model_name_or_path", str(tmp_path / "never-loaded"), *argv], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and flag in last and "never-loaded" not in err, err


def test_config_file_values_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("truncation: sideways\n")
    code, _, err = cli_result(["train", "--config", str(config)], capsys)
    assert code == 2 and "--truncation: 'sideways' is not one of drop, keep, split" in err


def test_gradient_checkpointing_reaches_the_model(tiny_model, data_file, tmp_path):
    """--gradient_checkpointing goes to TrainingArguments by its current name (activation_checkpointing) and
    the Trainer turns it on in the model it trains."""
    seen = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append((args.activation_checkpointing, model.is_gradient_checkpointing))

    train(args_for(tiny_model("llama"), data_file, tmp_path / "run", peft_type="lora", gradient_checkpointing=True),
          callbacks=[Watch()])
    assert seen == [(True, True)]
