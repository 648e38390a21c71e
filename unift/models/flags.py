"""The option groups several commands share: which model (ModelFlags) and what its config is loaded with
(ConfigFlags), dtypes (DtypeFlags), data (DataFlags), decoding (DecodingFlags) and where results go
(OutputFlags), the chat (ChatFlags). Each flag is written once, here; a command inherits a whole group, or takes single flags of
one with `unift.options.like(Group, "name")`, which is also how it states a default of its own (train's
--model_type is llama where inference takes the run folder's). Here, on the models floor, so that training,
evaluation and the commands can all build on them."""

from __future__ import annotations

from dataclasses import dataclass

from unift.data.templates import check_template
from unift.models.devices import DEVICE_HELP, check_device
from unift.models.overrides import attn_implementation_flag, rope_scaling_flag
from unift.models.registry import get_model_spec
from unift.options import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Options, Range, opt

# Names of the decoding presets (unift.inference.settings.PRESETS; a test keeps the two equal): written here so
# that building the flags does not import the inference package.
PRESET_NAMES = ("chat", "greedy", "original")
DTYPES = ("fp32", "bf16", "fp16")


def _check_model_type(value: str) -> str:
    return get_model_spec(value).name


@dataclass
class ModelFlags(Options):
    adapter_dir: str | None = opt(None, "a run folder written by `unift train` (it needs nothing else: base, "
                                  "method and template come from it) or any PEFT adapter folder; train: its "
                                  "adapter (full, freeze: its model) trains further, and dpo/kto/grpo take it as "
                                  "the reference", group="model", aliases=("--lora_dir", "--adapter_name_or_path"))
    model_name_or_path: str | None = opt(None, "the base model, a folder or hub id, or a merged model folder "
                                         "(default: the run folder's base, else the embedded SmolLM2-135M-Instruct)",
                                         group="model", aliases=("--base_model",))
    model_type: str | None = opt(None, "model family (a run folder's unless given; without one: llama)",
                                 group="model", check=_check_model_type)
    template: str | None = opt(None, "prompt template: a name or a FILE (.yaml/.json fields, .jinja) (default: the "
                               "run folder's, else the family's; 'auto' = tokenizer's; 'model' = the checkpoint's "
                               "own chat template, kept in the run)", group="model", check=check_template)
    trust_remote_code: bool | None = opt(None, "allow modelling code shipped with the checkpoint (default: the run "
                                         "folder's)", group="model")
    size: str | None = opt(None, "model size label, informational (the original toolkit's --size)", group="model")
    device: str = opt("auto", f"where the model runs: {DEVICE_HELP}; pick a GPU with CUDA_VISIBLE_DEVICES",
                      group="model", check=check_device)


@dataclass
class ConfigFlags(Options):
    """What the model's config is loaded with; a run folder's card gives both unless the flag is given."""

    rope_scaling: str | None = rope_scaling_flag()
    attn_implementation: str | None = attn_implementation_flag()


@dataclass
class DtypeFlags(Options):
    dtype: str | None = opt(None, "weights dtype (default: fp32 on CPU, bf16/fp16 on GPU); bf16 makes batched "
                            "generation ~2.4x faster on CPUs with AVX512-BF16, but greedy answers then depend on "
                            "the batch size", choices=DTYPES)
    compute_dtype: str = opt("auto", "dtype a run computes in (train; auto: bf16 where the CPU/GPU supports it), "
                             "or merge saves the weights in (auto: the base checkpoint's; QLoRA: the run's)",
                             group="model", choices=("auto", *DTYPES))


@dataclass
class DataFlags(Options):
    data: list[str] | None = opt(None, "dataset names from dataset_info.json, or paths to files or folders; several "
                                 "are merged (train: see --data_ratios; eval: held-out conversations, the last "
                                 "answer being the reference, arith_test unless --exam or --pairs is given)",
                                 group="data", nargs="+", aliases=("--dataset",))
    dataset_dir: str | None = opt(None, "folder with dataset_info.json (default: ./data, else the bundled one)",
                                  group="data")
    max_samples: int | None = opt(None, "use at most this many records of each input (each --data entry; predict: "
                                  "of --input; eval: of each task)", group="data", range=POSITIVE_INT)
    cutoff_len: int | None = opt(None, "most tokens per sequence: longer ones lose the prompt's front first (train: "
                                 "and earlier turns, so the answer keeps its end; predict, serve: the prompt alone "
                                 "is cut; eval: the scored sequence)", group="data", range=POSITIVE_INT)
    batch_size: int = opt(16, "examples generated or scored together (prompts left-padded)",
                          aliases=("--predict_batch_size",), range=POSITIVE_INT)


@dataclass
class DecodingFlags(Options):
    preset: str = opt("greedy", "named decoding settings; 'original' = the original toolkit's", group="decoding",
                      choices=PRESET_NAMES)
    max_new_tokens: int | None = opt(None, "longest answer (tokens; eval's default: the longest reference answer's "
                                     "length and a quarter more)", group="decoding", range=POSITIVE_INT)
    do_sample: bool | None = opt(None, "sample instead of greedy decoding", group="decoding")
    temperature: float | None = opt(None, "sampling temperature (train: of grpo's sampled completions)",
                                    group="decoding", range=POSITIVE)
    top_p: float | None = opt(None, "nucleus sampling mass", group="decoding", range=Range(0, 1, low_open=True))
    top_k: int | None = opt(None, "sample among the k likeliest tokens", group="decoding", range=NON_NEGATIVE)
    num_beams: int | None = opt(None, "beam search width", group="decoding", range=POSITIVE_INT)
    repetition_penalty: float | None = opt(None, "penalty on repeated tokens", group="decoding", range=POSITIVE)
    no_repeat_ngram_size: int | None = opt(None, "never repeat an n-gram of this size", group="decoding",
                                           range=NON_NEGATIVE)
    stop: list[str] | None = opt(None, "stop strings", group="decoding")
    seed: int | None = opt(None, "random seed (train: of the whole run; inference: reproducible sampled answers)",
                           range=NON_NEGATIVE)


@dataclass
class ChatFlags(Options):
    system: str | None = opt(None, "system prompt")


@dataclass
class OutputFlags(Options):
    output: str | None = opt(None, "file to write (eval: the results, default <adapter_dir or .>/eval_results.json; "
                             "data convert: .json a list, .jsonl one per line)")
    output_dir: str | None = opt(None, "folder to write (train: the run folder, default saved_models/<model_type>_"
                                 "<data>/<peft_type>; experiment: its runs and reports, default "
                                 "experiments/NAME-PRESET)")
    overwrite: bool = opt(False, "replace what is there (merge: a non-empty --merged_dir; predict: start over "
                          "instead of resuming)")
