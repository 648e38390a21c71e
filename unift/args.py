"""Typed run arguments. One dataclass per command; argparse flags and YAML keys come from the fields,
so the CLI, the --config file and the run card can never disagree about names or defaults."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unift.errors import UniftError


def opt(default: Any = None, help: str = "", *, group: str = "general", aliases: tuple[str, ...] = (),
        choices: Any = None, nargs: str | None = None, const: Any = None, check: Any = None,
        range: Range | None = None) -> Any:
    """A dataclass field that knows its flag. `check` validates a value and raises UniftError; `range`
    bounds a number (checked when the arguments are built, before anything loads)."""
    meta = {"help": help, "group": group, "aliases": aliases, "choices": choices, "nargs": nargs,
            "const": const, "check": check, "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric flag; `also` lists extra allowed values (such as -1 for "no limit")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    also: tuple = ()

    def contains(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if value in self.also:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}"

        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '≥'} {num(self.low)}"
        else:
            text = f"{'<' if self.high_open else '≤'} {num(self.high)}"
        return text + "".join(f" or {num(x)}" for x in self.also)


POSITIVE_INT = Range(1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1, high_open=True)  # dropout and warm-up fractions


def check_range(flag: str, value: Any, bounds: Range | None) -> None:
    """One line naming the flag when a number is out of its range (`--lora_r must be ≥ 1 (got 0)`)."""
    if bounds is None or value is None:
        return
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not bounds.contains(item):
            raise UniftError(f"--{flag} must be {bounds.describe()} (got {item:g})")


def check_ranges(args: Any) -> None:
    """Range-check every numeric field of an arguments dataclass."""
    for f in dataclasses.fields(args):
        check_range(f.name, getattr(args, f.name), f.metadata.get("range"))


def bounded(kind: type, bounds: Range):
    """An argparse `type` for a number in a range: `argument --top_p: must be in (0, 1] (got 0)`."""
    def convert(text: str) -> Any:
        value = kind(text)  # ValueError: argparse says "invalid int value"
        if not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()} (got {value:g})")
        return value

    convert.__name__ = kind.__name__
    return convert


def _check_model_type(value: str) -> str:
    from unift.models import get_model_spec

    return get_model_spec(value).name


def _check_peft_type(value: str) -> str:
    from unift.peft import get_method

    return get_method(value).name


def _check_optimizations(value: Any) -> str:
    from unift.accel import parse_optimizations

    parse_optimizations(value)  # raises UniftError naming the unknown ones
    return str(value) if not isinstance(value, list) else ",".join(value)


def _check_adapter_scaling(value: Any) -> str:
    from unift.peft.bottleneck import parse_scaling

    try:
        return str(parse_scaling(value))
    except ValueError as err:
        raise UniftError(f"--adapter_scaling: {err}") from None


@dataclass
class TrainArgs:
    # model
    model_type: str = opt("llama", "model family", group="model", check=_check_model_type)
    model_name_or_path: str | None = opt(
        None, "folder or hub id of the base model (default: the embedded SmolLM2-135M-Instruct)", group="model")
    size: str | None = opt(None, "model size label, informational (the original toolkit's --size)", group="model")
    template: str | None = opt(None, "prompt template (default: the family's; 'auto' = tokenizer's)", group="model")
    trust_remote_code: bool = opt(False, "allow modelling code shipped with the checkpoint", group="model")
    device: str = opt("auto", "where training runs: auto (the first GPU, else the CPU), cpu, cuda or mps; pick "
                      "a GPU with CUDA_VISIBLE_DEVICES", group="model")
    quantization_bit: int | None = opt(None, "load the base in 4 or 8 bits (bitsandbytes)", group="model",
                                       choices=(4, 8))
    compute_dtype: str = opt("auto", "compute dtype: auto (bf16 where the CPU/GPU supports it), fp32, bf16, fp16",
                             group="model", choices=("auto", "fp32", "bf16", "fp16"))
    # method
    peft_type: str = opt("lora", "PEFT method", group="method", check=_check_peft_type)
    lora_r: int = opt(8, "LoRA rank", group="lora", range=POSITIVE_INT)
    lora_alpha: int = opt(16, "LoRA scaling alpha", group="lora", range=POSITIVE)
    lora_dropout: float = opt(0.05, "LoRA dropout", group="lora", range=PROBABILITY)
    lora_target_modules: list[str] | None = opt(
        None, "modules to adapt, for every method that wraps layers (default: the family's and method's; "
        "LoRA-like methods: every linear layer of a block)", group="method", nargs="+",
        aliases=("--target_modules",))
    load_in_8bit: bool = opt(False, "load the base in 8-bit (lora, adalora, ia3; dora on GPU); = --quantization_bit 8",
                             group="lora")
    adalora_init_r: int = opt(12, "initial rank of every layer (--lora_r is the average target rank)",
                              group="adalora", range=POSITIVE_INT)
    adalora_tinit: int | None = opt(None, "steps before the budget starts to shrink (default: 10%% of the run)",
                                    group="adalora", range=NON_NEGATIVE)
    adalora_tfinal: int | None = opt(None, "last steps trained at the final budget (default: 20%% of the run)",
                                     group="adalora", range=NON_NEGATIVE)
    adalora_delta_t: int | None = opt(None, "steps between budget reallocations (default: 1%% of the run)",
                                      group="adalora", range=POSITIVE_INT)
    num_virtual_tokens: int = opt(20, "virtual tokens", group="prefix, p-tuning, prompt", range=POSITIVE_INT)
    prompt_encoder_hidden_size: int = opt(128, "hidden size of the prompt encoder MLP", group="p-tuning",
                                          range=POSITIVE_INT)
    prompt_init_text: str | None = opt(None, "initialise the soft prompt from this text (default: random)",
                                       group="prompt")
    oft_block_size: int = opt(32, "size of the orthogonal blocks (must divide the adapted layers' inputs)",
                              group="oft", range=POSITIVE_INT)
    vera_r: int = opt(256, "rank of VeRA's shared random matrices", group="vera", range=POSITIVE_INT)
    adapter_type: str = opt("houlsby", "houlsby (MLP, sequential), pfeiffer (MLP output), parallel (attention)",
                            group="adapters", choices=("houlsby", "pfeiffer", "parallel"))
    bottleneck_size: int = opt(256, "width of the adapter bottleneck", group="adapters", range=POSITIVE_INT)
    non_linearity: str = opt("tanh", "activation between down and up projections ('linear' makes it mergeable)",
                             group="adapters", choices=("tanh", "relu", "gelu", "silu", "sigmoid", "linear"))
    adapter_dropout: float = opt(0.0, "dropout on the adapter input", group="adapters", range=PROBABILITY)
    adapter_scaling: str = opt("1.0", "output scale: a number, or 'learned' (a trained scalar per layer)",
                               group="adapters", check=_check_adapter_scaling)
    adapter_init: str = opt("mam_adapter", "mam_adapter (up projection zero: starts as the identity) or bert "
                            "(normal 0.02, the original toolkit's default: changes the model before training)",
                            group="adapters", choices=("bert", "mam_adapter"))
    # data
    data: list[str] = opt(["arith"], "dataset names from dataset_info.json, or paths to files or folders; "
                          "several are merged (see --data_ratios)", group="data", nargs="+", aliases=("--dataset",))
    dataset_dir: str | None = opt(None, "folder with dataset_info.json (default: ./data, else the bundled one)",
                                  group="data")
    cutoff_len: int = opt(512, "maximum tokens per example (longer ones lose the prompt and earlier turns "
                          "first, so the answer keeps its end)", group="data", range=POSITIVE_INT)
    truncation: str = opt("drop", "an answer longer than --cutoff_len on its own: drop the example, or keep it "
                          "cut at the end (it then never ends)", group="data", choices=("drop", "keep"))
    val_set_size: float = opt(0, "held-out examples for evaluation (a count, or a fraction < 1)", group="data",
                                range=NON_NEGATIVE)
    max_samples: int | None = opt(None, "use at most this many examples from each --data entry", group="data",
                                    range=POSITIVE_INT)
    train_on_prompt: bool = opt(False, "also compute the loss on prompt tokens", group="data")
    data_ratios: list[float] | None = opt(
        None, "mixing proportions, one per --data entry (e.g. 0.7 0.3); the training size stays the sum",
        group="data", range=NON_NEGATIVE)
    streaming: bool = opt(False, "read the data lazily (larger than memory); needs --max_steps", group="data")
    num_proc: int | None = opt(None, "tokenization workers (default: one per 5000 records, at most 8)",
                               group="data", range=POSITIVE_INT)
    overwrite_cache: bool = opt(False, "tokenize again even if a cached copy exists", group="data")
    strict_data: bool = opt(False, "refuse a file with any record that cannot be trained (an empty answer, a "
                            "conversation ending on a user turn) instead of skipping and reporting it", group="data")
    # training
    output_dir: str | None = opt(None, "run folder (default: saved_models/<model_type>_<data>/<peft_type>)",
                                 group="training")
    epochs: float = opt(3.0, "training epochs", group="training", aliases=("--num_train_epochs",),
                        range=POSITIVE)
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --epochs)", group="training",
                         range=Range(1, also=(-1,)))
    per_gpu_train_batch_size: int = opt(4, "batch size per device", group="training",
                                        aliases=("--per_device_train_batch_size",), range=POSITIVE_INT)
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step", group="training", range=POSITIVE_INT)
    learning_rate: float = opt(3e-4, "peak learning rate", group="training", range=POSITIVE)
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", group="training")
    warmup_ratio: float = opt(0.03, "fraction of steps for warm-up", group="training", range=PROBABILITY)
    weight_decay: float = opt(0.0, "weight decay", group="training", range=NON_NEGATIVE)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, "
                                       "about a third slower", group="training")
    optimizations: str = opt("all", "speed-ups to use: all, none, or a comma-separated subset of base_dtype, "
                             "padding_free, label_loss, fused_lora, fast_dropout, lean_layers, cpu_attention (docs/performance.md)",
                             group="training", check=_check_optimizations)
    padding_free: str = opt("auto", "batches as one row without padding: auto (where the family and method "
                            "allow it), true (refuse otherwise), false", group="training",
                            choices=("auto", "true", "false"))
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding when "
                                "padding-free batches are off; changes which examples share a step)",
                                group="training")
    logging_steps: int = opt(10, "log every N steps", group="training", range=POSITIVE_INT)
    save_steps: int | None = opt(None, "checkpoint every N steps (default: once per epoch)", group="training",
                                 range=POSITIVE_INT)
    save_total_limit: int = opt(2, "checkpoints to keep", group="training", range=POSITIVE_INT)
    seed: int = opt(42, "random seed", group="training", range=NON_NEGATIVE)
    report_to: str = opt("none", "none, tensorboard, wandb (comma-separated)", group="training")
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (configs/deepspeed/; GPUs only)", group="training")
    resume_from_checkpoint: str | None = opt(
        None, "resume: a checkpoint folder, or no value for the latest in --output_dir", group="training",
        nargs="?", const="latest")
    local_rank: int = opt(-1, "set by the distributed launcher", group="training", aliases=("--local-rank",),
                          range=Range(-1))

    def __post_init__(self) -> None:
        # Cross-field checks between --model_type, --peft_type and the method flags, when the arguments are
        # built: `unift train` refuses an unsupported pair or an ignored flag before loading anything.
        from unift.peft import check_args

        check_ranges(self)
        check_args(self)


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) from an annotation such as `int | None` or `list[str] | None`."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__ import annotations`
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _wrap_check(scalar: Any, check: Any) -> Any:
    def convert(text: str) -> Any:
        value = scalar(text)
        if check is not None:
            try:
                return check(value)
            except UniftError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        return value

    convert.__name__ = getattr(scalar, "__name__", "value")
    return convert


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.get(meta.get("group", "general"))
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(f"{meta['group']} options")
        scalar, is_list = _flag_type(f.type)
        names = [f"--{f.name}", *meta.get("aliases", ())]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta.get("help", "") + (f" (default: {default})" if default not in (None, [], False) else "")
        if scalar is bool and not is_list:
            group.add_argument(*names, dest=f.name, nargs="?", const=True, default=default,
                               type=_parse_bool, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text,
                                  "type": _wrap_check(scalar, meta.get("check"))}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if is_list:
            kwargs["nargs"] = "+"
        elif meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
            kwargs["const"] = meta.get("const")
        group.add_argument(*names, **kwargs)


def load_yaml_defaults(path: str, cls: type, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Values from a YAML --config file; unknown keys are rejected. CLI flags override them."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise UniftError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UniftError(f"--config {path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UniftError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UniftError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    checked = {}
    for key, value in values.items():
        check = known[key].metadata.get("check")
        checked[key] = check(value) if (check and value is not None) else value
    return checked


def parse_into(cls: type, namespace: argparse.Namespace) -> Any:
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**values)


def command_line() -> str:
    return " ".join(sys.argv)
