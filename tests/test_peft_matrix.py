"""Every model_type x peft_type pair the support matrix calls "works" is proven here on a tiny random model
of that family: a few optimizer steps through the real `unift.train.train` make the loss fall, the adapter
saves and reloads through the generator to the same logits, and generation runs, with the KV-cache
path giving the same scores as a full forward pass. Pairs the matrix refuses fail at parse time with the
reason."""

from __future__ import annotations

import pytest
import torch

from unift.accel import OPTIMIZATIONS
from unift.cli import main
from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings
from unift.models.dtypes import torch_dtype
from unift.models.runcard import RunCard
from unift.peft import METHODS, MethodSpec, get_method, register_method
from unift.peft.support import support_matrix
from unift.train.args import TrainArgs
from unift.train.run import train

MATRIX = support_matrix()
WORKS = [(model, method) for model, row in MATRIX.items() for method, reason in row.items() if not reason]
STEPS = 4
# Methods that start as (or near) the identity and move slowly get a larger step so 4 steps show a fall.
LEARNING_RATE = {"ia3": 5e-2, "vera": 5e-2, "prompt": 5e-2, "prefix": 3e-2, "adalora": 3e-2,
                 "full": 1e-3, "freeze": 1e-3}
IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])
PROMPTS = [[{"role": "user", "content": "What is the code word number 3?"}], [{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Say the code word number 5, then the code word number 6, please."}]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(memorisation_file):
    return memorisation_file(8)


def train_args(model_type: str, peft_type: str, folder, data_file, out, **extra) -> TrainArgs:
    # compute_dtype auto: the dtype plan the test forces (tests/conftest.py dtype_plan), as users get it.
    values = dict(
        model_type=model_type, peft_type=peft_type, model_name_or_path=str(folder), data=[str(data_file)],
        output_dir=str(out), max_steps=STEPS, per_gpu_train_batch_size=8, cutoff_len=64,
        learning_rate=LEARNING_RATE.get(peft_type, 1e-2), warmup_ratio=0.0, lr_scheduler_type="constant",
        logging_steps=1, save_steps=1000, report_to="none",
        compute_dtype="auto",
    )
    return TrainArgs(**{**values, **extra})


def unwrapped(model):
    """The trained model without the autocast wrapper accelerate puts around forward for bf16 runs."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False).eval()


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out[:, -ids.shape[1]:].float()  # prompt tuning / p-tuning also return the virtual tokens' positions


def check_generation(generator: Generator) -> None:
    """Greedy generation with the KV cache scores every new token as a full forward pass over the whole
    sequence does (prefix tuning keeps its virtual keys in that cache), and the generator's batched,
    left-padded generation runs."""
    with torch.no_grad():
        out = generator.model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4,
                                       min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True)
    assert out.sequences.shape[1] == IDS.shape[1] + 4
    full = forward_logits(generator.model, out.sequences)[:, IDS.shape[1] - 1:-1]
    cached = torch.stack(out.logits, dim=1)
    assert torch.allclose(cached, full, atol=1e-3, rtol=1e-4), (cached - full).abs().max()
    # Batched with left padding (prompts of different lengths) = one by one, token for token: prompt-learning
    # methods put their virtual tokens before the padding, the classic place for this to break.
    settings = GenerationSettings(max_new_tokens=5)
    batched = generator.generate(PROMPTS, settings, batch_size=len(PROMPTS))
    alone = [generator.generate([prompt], settings)[0] for prompt in PROMPTS]
    assert [(c.text, c.completion_tokens) for c in batched] == [(c.text, c.completion_tokens) for c in alone]
    # the trained question gets an answer; an untrained one may end at once (a tiny model may answer EOS)
    assert batched[0].completion_tokens >= 1
    streams = [generator.open_stream(prompt, settings) for prompt in PROMPTS]  # batched by the scheduler
    streamed = [("".join(stream).strip(), stream.completion_tokens) for stream in streams]
    # a stream holds back half of a multi-byte character at the end (decoded at once it shows as U+FFFD)
    assert streamed == [(c.text.rstrip("\ufffd").strip(), c.completion_tokens) for c in alone]


@pytest.mark.parametrize(("model_type", "peft_type"), WORKS, ids=[f"{m}-{p}" for m, p in WORKS])
def test_pair_trains_saves_reloads_and_generates(tiny_model, data_file, tmp_path, model_type, peft_type, dtype_plan):
    result = train(train_args(model_type, peft_type, tiny_model(model_type), data_file, tmp_path / "run"))
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses

    assert RunCard.load(result.output_dir).compute_dtype == dtype_plan
    # every lever of the default --optimizations all either works with this method under this plan or is
    # switched off with its reason (printed in the log)
    applied = {lever.split(" ")[0] for lever in result.metrics["optimizations"]}
    skipped = result.metrics["optimizations_skipped"]
    assert applied.isdisjoint(skipped) and applied | set(skipped) == set(OPTIMIZATIONS), (applied, skipped)
    assert all(skipped.values())
    # reloaded in the dtype the base was trained in (bf16 under the bf16 plan), to compare like with like
    as_trained = Generator.load(str(result.output_dir), dtype=torch_dtype(RunCard.load(result.output_dir).base_dtype))
    reloaded = forward_logits(as_trained.model, IDS)
    # the generator merges the adapter into the weights it loads (W + BA rounds otherwise than x W + (x A) B):
    # in fp32 the two agree to about 1e-5 (measured up to 1.3e-5), far below what training moved them (below)
    assert torch.allclose(reloaded, forward_logits(unwrapped(result.model), IDS), atol=1e-4, rtol=1e-4)
    if get_method(peft_type).holds_model:  # full, freeze: the run folder is the trained model, no adapter
        base = Generator.load(base_model=str(tiny_model(model_type)), model_type=model_type).model
        assert not torch.allclose(forward_logits(base, IDS), reloaded)  # training changed the model
    else:
        with as_trained.model.disable_adapter():
            assert not torch.allclose(forward_logits(as_trained.model, IDS), reloaded)  # the adapter does something
    check_generation(Generator.load(str(result.output_dir)))  # the default generator (fp32 on a CPU)


def test_refused_pairs_fail_at_parse_time_with_the_reason(capsys, tmp_path):
    """Every pair the matrix refuses exits with the reason before any model loads. The shipped registries
    currently refuse none, so a method registered for the test declares one family unsupported; the
    loop then covers it and any pair a future registry entry refuses."""
    spec = register_method(MethodSpec(name="test-only", build=lambda o, s: None, description="test",
                                      unsupported={"bloom": "it needs rotary position embeddings"}))
    try:
        refused = [(m, p, why) for m, row in support_matrix().items() for p, why in row.items() if why]
        assert ("bloom", "test-only", "it needs rotary position embeddings") in refused
        for model_type, peft_type, reason in refused:
            code = main(["train", "--model_type", model_type, "--peft_type", peft_type,
                         "--model_name_or_path", str(tmp_path / "never-loaded"), "--data", str(tmp_path / "none")])
            err = capsys.readouterr().err
            assert code == 2
            assert err.strip() == (f"unift: error: --peft_type {peft_type} does not work with --model_type "
                                   f"{model_type}: {reason}")
    finally:
        METHODS.pop(spec.name)
    assert support_matrix() == MATRIX
