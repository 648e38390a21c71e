"""`unift train`'s arguments: the general flags (RunArgs) plus every stage's and every PEFT method's own
flags, gathered from their registries (a new stage or method brings its flags with it; nothing here
changes). The CLI, the --config
YAML, experiment files and the run card's `arguments` all use these field names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unift.accel import parse_optimizations
from unift.errors import UniftError
from unift.models import ModelSpec, get_model_spec
from unift.models.flags import ConfigFlags, DataFlags, DecodingFlags, DtypeFlags, ModelFlags, OutputFlags
from unift.options import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Range,
    check_choices,
    check_ranges,
    default_of,
    like,
    opt,
)
from unift.peft import MethodSpec, check_args, get_method, method_flag_fields
from unift.train.optim import (
    check_optim,
    check_optim_args,
    check_optim_pair,
    check_optim_run,
    check_scheduler,
    check_scheduler_eval,
)
from unift.train.parent import adopt_parent
from unift.train.progress import check_report_to
from unift.train.stages import apply_stage_optimizer, check_stage, stage_flag_fields


def _check_peft_type(value: str) -> str:
    return get_method(value).name


def _check_stage(value: str) -> str:
    from unift.train.stages import get_stage

    return get_stage(value).name


def _check_optimizations(value: Any) -> str:

    parse_optimizations(value)  # raises UniftError naming the unknown ones
    return str(value) if not isinstance(value, list) else ",".join(value)


@dataclass
class RunArgs(ConfigFlags, ModelFlags):
    """The general training flags; each PEFT method adds its own (MethodSpec.flags) to make TrainArgs."""

    # model
    model_type: str = like(ModelFlags, "model_type", "llama")  # a run needs a family before any folder is read
    template_check: str = opt("report", "at start, compare --template with the checkpoint's chat template on probe "
                              "conversations: report (one line), strict (stop when they differ), off", group="model",
                              choices=("report", "strict", "off"))
    trust_remote_code: bool = like(ModelFlags, "trust_remote_code", False)  # off unless given: it runs code
    quantization_bit: int | None = opt(None, "load the base in 4 or 8 bits (bitsandbytes)", group="model",
                                       choices=(4, 8))
    compute_dtype: str = like(DtypeFlags, "compute_dtype")
    # method
    peft_type: str = opt("lora", "PEFT method", group="method", check=_check_peft_type)
    load_in_8bit: bool = opt(False, "load the base in 8-bit (lora, adalora, ia3; dora on GPU); = --quantization_bit 8",
                             group="model")
    # stage
    stage: str = opt("sft", "what to train: sft (supervised), dpo, orpo, simpo (preference pairs), kto (answers "
                     "labelled good or bad), rm (a reward model over pairs), grpo (rewards on sampled answers); "
                     "docs/stages.md", group="stage", check=_check_stage)
    # data
    data: list[str] = like(DataFlags, "data", ["arith"])  # the bundled task: a run with no flags trains
    dataset_dir: str | None = like(DataFlags, "dataset_dir")
    cutoff_len: int = like(DataFlags, "cutoff_len", 512)
    truncation: str = opt("drop", "an answer longer than --cutoff_len on its own: drop the example, or keep it "
                          "cut at the end (it then never ends); split: cut prompt and answer each from the end, "
                          "sharing the cut between them turn by turn (as LLaMA-Factory does)", group="data",
                          choices=("drop", "keep", "split"))
    val_set_size: float = opt(0, "held-out examples for evaluation (a count, or a fraction < 1)", group="data",
                                range=NON_NEGATIVE)
    max_samples: int | None = like(DataFlags, "max_samples")
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
    output_dir: str | None = like(OutputFlags, "output_dir", trainer="output_dir")
    epochs: float = opt(3.0, "training epochs", group="training", aliases=("--num_train_epochs",),
                        range=POSITIVE, trainer="num_train_epochs")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --epochs)", group="training",
                         range=Range(1, also=(-1,)), trainer="max_steps")
    per_gpu_train_batch_size: int = opt(4, "batch size per device", group="training",
                                        aliases=("--per_device_train_batch_size",), range=POSITIVE_INT,
                                        trainer=("per_device_train_batch_size", "per_device_eval_batch_size"))
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step", group="training", range=POSITIVE_INT,
                                           trainer="gradient_accumulation_steps")
    learning_rate: float = opt(3e-4, "peak learning rate (--stage grpo without --optim: 0.3, for its SGD)",
                               group="training", range=POSITIVE, trainer="learning_rate")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule, by transformers' name (linear, cosine, "
                                 "constant, constant_with_warmup, cosine_with_min_lr, ...; without --optim, --stage dpo, orpo, "
                                 "simpo, kto: linear, no warm-up, as TRL; grpo: constant, no warm-up)", group="training",
                                 check=check_scheduler, trainer="lr_scheduler_type")
    optim: str | None = opt(None, "optimizer, by transformers' name: adamw_torch, adamw_torch_fused, adafactor, "
                            "sgd, adagrad, rmsprop, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, lion_8bit, ...; "
                            "full/freeze on little memory: galore_adamw, galore_adamw_layerwise, apollo_adamw, ... "
                            "and unift's badam (--peft_type full) and muon (Muon for the hidden layers' matrices, "
                            "AdamW for the rest) (default: transformers' own, adamw_torch_fused; qlora on a GPU: "
                            "paged_adamw_32bit; --stage grpo: sgd, docs/stages.md)", group="training",
                            check=check_optim)
    optim_args: str | None = opt(None, "the optimizer's own settings as key=value,key=value (sgd: momentum, "
                                 "nesterov; rmsprop: alpha, centered; galore_*: rank, update_proj_gap, scale, "
                                 "proj_type; apollo_*: also proj, scale_type)", group="training",
                                 check=check_optim_args, trainer="optim_args")
    optim_target_modules: list[str] | None = opt(
        None, "galore_*, apollo_*: the linear layers whose gradients are projected to low rank, as transformers "
        "matches them: module names (q_proj, mlp), regexes over whole names, or all-linear (default: every linear "
        "layer inside the decoder layers, attention and MLP; not the embeddings or the head)", group="training",
        nargs="+")
    badam_switch_every: int = opt(50, "--optim badam: optimizer steps before the next block (decoder layer) "
                                  "trains", group="training", range=POSITIVE_INT)
    badam_switch_mode: str = opt("descending", "--optim badam: the order the blocks train in: descending (the "
                                 "last decoder layer first), ascending, random", group="training",
                                 choices=("descending", "ascending", "random"))
    neftune_noise_alpha: float | None = opt(None, "NEFTune: uniform noise of this scale on the input embeddings "
                                            "while training (not in evaluation or generation); 5 is the paper's "
                                            "usual value", group="training", range=POSITIVE,
                                            trainer="neftune_noise_alpha")
    warmup_ratio: float = opt(0.03, "fraction of steps for warm-up (0 for the preference and grpo stages "
                              "without --optim)", group="training", range=PROBABILITY,
                              trainer="warmup_steps")  # transformers 5: a float in [0, 1) is a ratio of all steps
    weight_decay: float = opt(0.0, "weight decay", group="training", range=NON_NEGATIVE, trainer="weight_decay")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, "
                                       "about a third slower", group="training",
                                       trainer="activation_checkpointing")  # transformers 5.23+ name
    optimizations: str = opt("all", "speed-ups to use: all, none, or a comma-separated subset of base_dtype, "
                             "bf16_storage, padding_free, label_loss, fused_lora, fast_dropout, lean_layers, "
                             "cpu_attention, merged_sampling (docs/performance.md)",
                             group="training", check=_check_optimizations)
    release_memory: bool = opt(False, "hand each freed activation back to the system at once (glibc): a lower "
                               "peak RSS (measured: 4,471 -> 2,899 MiB at 360M parameters and 512 tokens), "
                               "slower steps from page faults (twice the time on a 135M model at 128 tokens)",
                               group="training")
    padding_free: str = opt("auto", "batches as one row without padding: auto (where the family and method "
                            "allow it), true (refuse otherwise), false", group="training",
                            choices=("auto", "true", "false"))
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding when "
                                "padding-free batches are off; changes which examples share a step)",
                                group="training")
    logging_steps: int = opt(10, "log every N steps", group="training", range=POSITIVE_INT)
    save_steps: int | None = opt(None, "checkpoint every N steps (default: once per epoch)", group="training",
                                 range=POSITIVE_INT)
    save_total_limit: int = opt(2, "checkpoints to keep", group="training", range=POSITIVE_INT,
                               trainer="save_total_limit")
    seed: int = like(DecodingFlags, "seed", 42, trainer="seed")
    report_to: str = opt("none", "none, tensorboard, wandb (comma-separated)", group="training",
                         check=check_report_to)
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (configs/deepspeed/; GPUs or CPU, docs/scaling.md)", group="training")
    resume_from_checkpoint: str | None = opt(
        None, "resume: a checkpoint folder, or no value for the latest in --output_dir", group="training",
        nargs="?", const="latest")
    plan: bool = opt(False, "print the run's predicted peak memory per process and its time per step and in all, "
                     "from the model's shape and a short timed probe (its first steps on its longest examples), "
                     "and exit without training (docs/plan.md)", group="plan")
    plan_steps: int = opt(3, "--plan: optimizer steps the probe runs (the first, its warm-up, is not timed); 0: the "
                          "estimate alone, no step", group="plan", range=NON_NEGATIVE)
    plan_json: str | None = opt(None, "--plan: also write the plan as JSON to this file (- for standard output)",
                                group="plan")
    force: bool = opt(False, "train even where the predicted peak memory exceeds the memory available (RAM on a "
                      "CPU, the GPU's on CUDA); every run checks before its first step", group="plan")
    local_rank: int = opt(-1, "set by the distributed launcher", group="training", aliases=("--local-rank",),
                          range=Range(-1))

    @property
    def method(self) -> MethodSpec:
        """The --peft_type's registry entry (the name is canonical once the arguments are built)."""
        return get_method(self.peft_type)

    @property
    def spec(self) -> ModelSpec:
        """The --model_type's registry entry."""
        return get_model_spec(self.model_type)

    def __post_init__(self) -> None:
        # Cross-field checks between --model_type, --peft_type and the method flags, when the arguments are
        # built: `unift train` refuses an unsupported pair or an ignored flag before loading anything.
        adopt_parent(self)  # --adapter_dir: the folder's method, base and template, before anything reads them
        defaults = {f.name: default_of(f) for f in dataclasses.fields(self)}
        apply_stage_optimizer(self, defaults)  # e.g. --stage grpo trains with SGD unless --optim is given
        check_ranges(self)
        check_choices(self)
        check_args(self)
        check_stage(self, defaults)
        check_optim_pair(self.optim, self.optim_args)
        check_optim_run(self)
        check_scheduler_eval(self.lr_scheduler_type, self.val_set_size)
        if self.neftune_noise_alpha is not None and self.padding_free == "true":
            # The Trainer scales the noise by the row's length; a packed row is several examples long.
            raise UniftError("--neftune_noise_alpha scales its noise by the length of a row, and a padding-free "
                             "row holds several examples: use --padding_free auto or false with it")


def _compose() -> type:
    fields = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                metadata=f.metadata))
              for f in [*stage_flag_fields(), *method_flag_fields()]]
    return dataclasses.make_dataclass("TrainArgs", fields, bases=(RunArgs,), namespace={"__module__": __name__})


# RunArgs plus every stage's and every method's flags: what `unift train` parses and `train()` takes.
TrainArgs: type[RunArgs] = _compose()
