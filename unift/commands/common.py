"""Option groups shared by the commands that load a model for inference (generate, chat, predict, eval,
merge, serve): which model, on which device and dtype, and how to decode. Each command's options dataclass
inherits the groups it takes."""

from __future__ import annotations

from dataclasses import dataclass

from unift.data.templates import check_template
from unift.models.devices import DEVICE_HELP, check_device
from unift.models.dtypes import parse_dtype
from unift.models.overrides import attn_implementation_flag, rope_scaling_flag
from unift.options import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Options, Range, opt

# Names of the decoding presets (unift.engine.settings.PRESETS; a test keeps the two equal): written here so
# that building the flags does not import the engine.
PRESET_NAMES = ("chat", "greedy", "original")


@dataclass
class ModelOptions(Options):
    adapter_dir: str | None = opt(None, "run folder written by `unift train` (needs nothing else), or any PEFT "
                                  "adapter folder", group="model", aliases=("--lora_dir",))
    model_name_or_path: str | None = opt(None, "base or merged model folder (default: the run card's, else the "
                                         "embedded model)", group="model", aliases=("--base_model",))
    model_type: str | None = opt(None, "model family (default: the run card's, else llama)", group="model")
    template: str | None = opt(None, "prompt template: a name or a FILE (.yaml/.json fields, .jinja) "
                               "(default: the run card's)", group="model", check=check_template)
    trust_remote_code: bool | None = opt(None, "allow modelling code shipped with the checkpoint", group="model")
    size: str | None = opt(None, "informational, accepted for the original toolkit's commands", group="model")
    device: str = opt("auto", f"where the model runs: {DEVICE_HELP}", group="model", check=check_device)


@dataclass
class FindRunOptions(ModelOptions):
    """The original toolkit's way to name a run: by its training data."""

    run_data: list[str] | None = opt(None, "use the run `uniform_finetune.py --model_type T --data NAME` wrote "
                                     "under saved_models/ (the newest if several); the original toolkit's way",
                                     group="model", flag="--data", metavar="NAME")


@dataclass
class DtypeOptions(Options):
    dtype: str | None = opt(None, "weights dtype (default: fp32 on CPU, bf16/fp16 on GPU); bf16 makes batched "
                            "generation ~2.4x faster on CPUs with AVX512-BF16, but greedy answers then depend on "
                            "the batch size", choices=("fp32", "bf16", "fp16"))


@dataclass
class ConfigOptions(Options):
    """What the model's config is loaded with; a run folder's card gives both unless the flag is given."""

    rope_scaling: str | None = rope_scaling_flag()
    attn_implementation: str | None = attn_implementation_flag()


@dataclass
class DecodingOptions(Options):
    preset: str = opt("greedy", "named decoding settings; 'original' = the original toolkit's", group="decoding",
                      choices=PRESET_NAMES)
    max_new_tokens: int | None = opt(None, "longest answer (tokens)", group="decoding", range=POSITIVE_INT)
    do_sample: bool | None = opt(None, "sample instead of greedy decoding", group="decoding")
    temperature: float | None = opt(None, "sampling temperature", group="decoding", range=POSITIVE)
    top_p: float | None = opt(None, "nucleus sampling mass", group="decoding", range=Range(0, 1, low_open=True))
    top_k: int | None = opt(None, "sample among the k likeliest tokens", group="decoding", range=NON_NEGATIVE)
    num_beams: int | None = opt(None, "beam search width", group="decoding", range=POSITIVE_INT)
    repetition_penalty: float | None = opt(None, "penalty on repeated tokens", group="decoding", range=POSITIVE)
    no_repeat_ngram_size: int | None = opt(None, "never repeat an n-gram of this size", group="decoding",
                                           range=NON_NEGATIVE)
    stop: list[str] | None = opt(None, "stop strings", group="decoding")
    seed: int | None = opt(None, "random seed for sampling (reproducible sampled answers)", group="decoding",
                           range=NON_NEGATIVE)

    def decoding(self):
        """The GenerationSettings these flags ask for: the preset, overridden by the flags given."""
        from unift.engine.settings import settings_from

        return settings_from(self.preset, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                             temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                             num_beams=self.num_beams, repetition_penalty=self.repetition_penalty,
                             no_repeat_ngram_size=self.no_repeat_ngram_size, stop=self.stop, seed=self.seed)


def load_engine(options: ModelOptions):
    """The Engine for a command's model options (a run named by --data is found first)."""
    from unift.engine.engine import Engine
    from unift.models.runcard import find_run

    adapter_dir = options.adapter_dir
    if getattr(options, "run_data", None) and not adapter_dir:
        adapter_dir = options.adapter_dir = find_run(options.run_data, options.model_type)
    return Engine.load(adapter_dir, base_model=options.model_name_or_path, model_type=options.model_type,
                       template=options.template, trust_remote_code=options.trust_remote_code,
                       dtype=parse_dtype(getattr(options, "dtype", None)), device=options.device,
                       rope_scaling=getattr(options, "rope_scaling", None),
                       attn_implementation=getattr(options, "attn_implementation", None))
