"""--optim, --optim_args and --lr_scheduler_type: transformers' own optimizer and schedule names, checked when
the arguments are built (a wrong name, or an optimizer whose library is missing, fails in one line before
any model loads, not in TrainingArguments after it).

Measured on a CPU with torch 2.13, transformers 5.24, bitsandbytes 0.50.2: adamw_torch, adamw_torch_fused,
adafactor, sgd, adagrad, rmsprop and bitsandbytes' adamw_8bit, paged_adamw_8bit, paged_adamw_32bit,
lion_8bit/32bit, ademamix(_8bit), rmsprop_bnb_8bit all step a model (bitsandbytes has a CPU backend; "paged"
changes nothing there). GaLore (galore-torch 1.0) and APOLLO (apollo-torch 1.0.3) step a model once
transformers gets `optim_target_modules` (--optim_target_modules, or the decoder layers' linear layers);
BAdam (badam 1.4) and Muon (torch's, with AdamW beside it) are unift's own names, built in unift.train.badam
and unift.train.muon. The others need libraries that are not installed here; they are refused with the
package to install."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from typing import Any

from unift.errors import UniftError

log = logging.getLogger("unift")

# name prefix -> (module to import, what to pip install); the first match wins
NEEDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("galore_",), "galore_torch", "galore-torch"),
    (("apollo_",), "apollo_torch", "apollo-torch"),
    (("lomo", "adalomo"), "lomo_optim", "lomo-optim"),
    (("schedule_free_",), "schedulefree", "schedulefree"),
    (("grokadamw",), "grokadamw", "grokadamw"),
    (("adamw_torch_4bit", "adamw_torch_8bit"), "torchao", "torchao"),
    (("stable_adamw",), "optimi", "torch-optimi"),
    (("adamw_anyprecision",), "torchdistx", "torchdistx"),
    (("adamw_torch_xla",), "torch_xla", "torch_xla (it runs on TPUs)"),
    (("adamw_torch_npu_fused",), "torch_npu", "torch_npu (it runs on Ascend NPUs)"),
    (("adamw_bnb", "adamw_8bit", "paged_", "lion_", "ademamix", "rmsprop_bnb"), "bitsandbytes", "bitsandbytes"),
    (("badam",), "badam", "badam"),
)
# Optimizers whose transformers builder projects the gradients of the layers named by optim_target_modules
# into a low-rank space (GaLore, APOLLO)
TARGETED = ("galore_", "apollo_")
LAYERWISE = "_layerwise"
# unift's own optimizer names, built by unift rather than transformers (unift.train.badam, unift.train.muon),
# and their flags
OWN = ("badam", "muon")
BADAM_FLAGS = ("badam_switch_every", "badam_switch_mode")
GALORE_ARGS = ("rank", "update_proj_gap", "scale", "proj_type")
APOLLO_ARGS = ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")
# How transformers 5.25 converts those keys (int(), float(), or a name the optimizer compares against):
# checked here, so `rank=abc` fails in one line before the model loads instead of in the Trainer.
ARG_VALUES: dict[str, type | tuple[str, ...]] = {
    "rank": int, "update_proj_gap": int, "scale": float,
    "proj_type": ("std", "reverse_std", "right", "left", "full"), "proj": ("random", "svd"),
    "scale_type": ("channel", "tensor"),
}
# The --optim_args keys transformers reads for these optimizers; () = none (their settings are other flags)
ARGS_READ: dict[str, tuple[str, ...]] = {
    "adamw_torch": (), "adamw_torch_fused": (), "adafactor": (), "adamw_bnb_8bit": (), "adamw_8bit": (),
    "paged_adamw_8bit": (), "paged_adamw_32bit": (), "lion_8bit": (), "lion_32bit": (), "paged_lion_8bit": (),
    "paged_lion_32bit": (), "badam": (), "muon": (),
    **{name: GALORE_ARGS for name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                                      "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise")},
    "apollo_adamw": APOLLO_ARGS, "apollo_adamw_layerwise": APOLLO_ARGS,
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "weight_decay", "centered"),
}


def optimizer_names() -> tuple[str, ...]:
    """transformers' optimizer names, then unift's own."""
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames) + OWN


def default_optimizer() -> str:
    """transformers' own default (adamw_torch_fused in 5.24), which unift keeps."""
    from transformers import TrainingArguments

    return str(TrainingArguments.__dataclass_fields__["optim"].default)


def scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


# Schedules that need settings unift does not pass (measured: transformers 5.24 fails when it builds them)
NEEDS_KWARGS = {"cosine_with_min_lr": "min_lr or min_lr_rate", "cosine_warmup_with_min_lr": "min_lr or min_lr_rate",
                "warmup_stable_decay": "num_decay_steps"}
# Schedules driven by the evaluation loss: they need held-out data
NEEDS_EVAL = ("reduce_lr_on_plateau", "greedy")


def check_scheduler(value: str) -> str:
    if value not in scheduler_names():
        raise UniftError(f"unknown --lr_scheduler_type {value!r}; known: {', '.join(scheduler_names())}")
    if value in NEEDS_KWARGS:
        raise UniftError(f"--lr_scheduler_type {value} needs lr_scheduler_kwargs ({NEEDS_KWARGS[value]}), which "
                         "unift does not pass; use cosine, linear, constant or another")
    return value


def check_scheduler_eval(value: str, val_set_size: float) -> None:
    if value in NEEDS_EVAL and not val_set_size:
        raise UniftError(f"--lr_scheduler_type {value} follows the evaluation loss: it needs --val_set_size > 0")


def check_optim(value: str | None) -> str | None:
    """A transformers optimizer name whose library is installed (None: the method's default)."""
    if value is None:
        return None
    if value not in optimizer_names():
        raise UniftError(f"unknown --optim {value!r}; known: {', '.join(optimizer_names())}")
    if value == "muon":
        import torch

        if not hasattr(torch.optim, "Muon"):  # unift builds on torch's own Muon; older torch has none
            raise UniftError(f"--optim muon needs torch.optim.Muon, which torch {torch.__version__} does not have "
                             "(pip install -U torch)")
    for prefixes, module, package in NEEDS:
        if value.startswith(prefixes):
            if importlib.util.find_spec(module) is None:
                raise UniftError(f"--optim {value} needs the {package} package, which is not installed "
                                 f"(pip install {package.split()[0]})")
            break
    return value


def parse_optim_args(value: str | None) -> dict[str, str]:
    """'key=value,key=value' as TrainingArguments.optim_args reads it."""
    pairs = {}
    for item in (value or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, setting = item.partition("=")
        if not sep or not key or not setting or "=" in setting:
            raise UniftError(f"--optim_args: {item!r} is not key=value (several: key=value,key=value)")
        pairs[key] = setting
    return pairs


def check_optim_args(value: str | None) -> str | None:
    parse_optim_args(value)
    return value


def check_optim_pair(optim: str | None, optim_args: str | None) -> None:
    """--optim_args keys the chosen optimizer would silently ignore are an error (transformers drops them)."""
    keys = parse_optim_args(optim_args)
    name = optim or default_optimizer()
    if not keys or name not in ARGS_READ:
        return
    ignored = [k for k in keys if k not in ARGS_READ[name]]
    if ignored:
        reads = ", ".join(ARGS_READ[name]) or "none (use --learning_rate, --weight_decay)"
        raise UniftError(f"--optim_args {', '.join(ignored)}: not read by --optim {name}; it reads {reads}")
    if name.startswith(TARGETED):
        for key, setting in keys.items():
            _check_arg_value(key, setting)


def _check_arg_value(key: str, setting: str) -> None:
    kind = ARG_VALUES[key]
    if isinstance(kind, tuple):
        if setting not in kind:
            raise UniftError(f"--optim_args {key}={setting}: not one of {', '.join(kind)}")
        return
    try:
        number = kind(setting)
    except ValueError:
        raise UniftError(f"--optim_args {key}={setting}: not {'an integer' if kind is int else 'a number'}") from None
    if number <= 0:
        raise UniftError(f"--optim_args {key}={setting}: must be > 0")


def _flag_default(args: Any, name: str) -> Any:
    field = next(f for f in dataclasses.fields(args) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def check_optim_run(args: Any) -> None:
    """--optim against the method and the other training flags, when the arguments are built: a flag the
    optimizer would ignore, or a method it cannot work with, is one line before anything loads."""
    import torch

    name = args.optim or default_optimizer()
    if args.optim_target_modules and not name.startswith(TARGETED):
        raise UniftError(f"--optim_target_modules is read by the galore_* and apollo_* optimizers only, not by "
                         f"--optim {name}")
    ignored = [f"--{flag}" for flag in BADAM_FLAGS if getattr(args, flag) != _flag_default(args, flag)]
    if ignored and name != "badam":
        raise UniftError(f"{', '.join(ignored)}: read by --optim badam only, not by --optim {name}")
    method = args.method
    if name.startswith(TARGETED):
        if not method.holds_model:
            raise UniftError(f"--optim {name} projects the gradients of the model's own weight matrices: it needs "
                             f"--peft_type full or freeze, not {method.name} (an adapter's matrices are small already)")
        if name.endswith(LAYERWISE) and args.gradient_accumulation_steps > 1:
            raise UniftError(f"--optim {name} steps each weight inside the backward pass, so gradients cannot "
                             f"accumulate: use --gradient_accumulation_steps 1, or --optim {name[:-len(LAYERWISE)]}")
        if "8bit" in name and (args.device == "cpu" or not torch.cuda.is_available()):
            raise UniftError(f"--optim {name} needs a CUDA GPU: galore-torch 1.0 calls torch.cuda.synchronize() in "
                             f"every step; use --optim {name.replace('_8bit', '')}")
        if args.weight_decay:
            # transformers builds them with the learning rate only; the optimizers' own default is 0
            raise UniftError(f"--weight_decay is not passed to --optim {name} by transformers; drop it or pick "
                             "another optimizer")
    if name == "muon" and not method.trains_matrices:
        raise UniftError(f"--optim muon steps weight matrices, and --peft_type {method.name} trains none (its "
                         f"weights are vectors or embeddings); use another --optim such as adamw_torch")
    if name == "badam" and method.name != "full":
        raise UniftError(f"--optim badam chooses which decoder layers train, one block at a time: it needs "
                         f"--peft_type full, not {method.name}")


def check_optim_engine(args: Any, engine: str) -> None:
    """Engines the optimizer cannot run under (the engine is known when training starts: accelerate passes
    it in the environment)."""
    name = args.optim or ""
    if name.startswith(TARGETED) and engine == "deepspeed":  # measured under ZeRO-2: an IndexError in the projector
        raise UniftError(f"--optim {name} under DeepSpeed is not supported: ZeRO hands the optimizer flat "
                         "partitions of the weights, which have no matrix shape to project; use DDP (torchrun)")
    if name.endswith(LAYERWISE) and engine != "single":
        raise UniftError(f"--optim {name} steps each weight inside the backward pass, which transformers does not "
                         f"support across processes; use --optim {name[:-len(LAYERWISE)]} or one process")
    if name == "muon" and engine in ("deepspeed", "fsdp"):
        # ZeRO hands the optimizer flat 1-D partitions (torch's Muon refuses them); FSDP a shard of each
        # matrix, on which Muon's whole-matrix step was not checked
        raise UniftError(f"--optim muon under {'DeepSpeed' if engine == 'deepspeed' else 'FSDP'} is not supported: "
                         "Muon orthogonalises each weight matrix whole, and the engine gives the optimizer pieces "
                         "of them; use DDP (torchrun) or one process")
    if name == "badam" and engine != "single":
        # Measured: under DDP the blocks that take over later are not averaged across processes (their
        # weights differ between ranks after a switch); under ZeRO-2 the active block gets no gradients.
        raise UniftError("--optim badam runs in one process without DeepSpeed: it changes which weights train every "
                         "few steps, and DDP and DeepSpeed set up the trained weights once, when they wrap the model")


def low_rank_targets(args: Any, model: Any) -> str | list[str] | None:
    """TrainingArguments.optim_target_modules for GaLore and APOLLO (None for other optimizers): the
    --optim_target_modules entries, each checked to match a linear layer (transformers would drop a typo
    silently), or by default every linear layer inside the decoder layers: attention and MLP, not the
    embeddings or the output head, as the GaLore and APOLLO papers project."""
    name = args.optim or ""
    if not name.startswith(TARGETED):
        return None
    from torch import nn
    from transformers.trainer_utils import check_target_module_exists

    from unift.peft.methods.freeze import decoder_layers

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    given = args.optim_target_modules or []
    given = [given] if isinstance(given, str) else given  # a --config file may hold one name, not a list
    items = [p.strip() for item in given for p in str(item).split(",") if p.strip()]
    targets: str | list[str]
    if [i.replace("_", "-") for i in items] == ["all-linear"]:
        targets, matched = "all-linear", linear
    elif items:
        for item in items:
            if not any(check_target_module_exists([item], n) for n in linear):
                leaves = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
                raise UniftError(f"--optim_target_modules {item}: matches no linear layer of the model (its linear "
                                 f"layers: {leaves})")
        targets = items
        matched = [n for n in linear if check_target_module_exists(items, n)]
    else:
        stack, _ = decoder_layers(model)
        targets = rf"{re.escape(stack)}\.\d+\..+"  # transformers: a string is a regex matched against whole names
        matched = [n for n in linear if re.fullmatch(targets, n)]
        if not matched:
            raise UniftError(f"--optim {name}: {type(model).__name__} has no torch Linear layers in {stack}; name "
                             "the layers to project with --optim_target_modules")
    trained = [n for n in matched if model.get_submodule(n).weight.requires_grad]
    if not trained:
        raise UniftError(f"--optim {name}: none of the {len(matched)} layers it projects trains under --peft_type "
                         f"{args.peft_type}; pick trained layers with --optim_target_modules")
    log.info("--optim %s: low-rank optimizer state for %d trained linear layers (%s); the other weights get "
             "plain %s", name, len(trained), ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in trained)),
             "Adafactor" if "adafactor" in name else "AdamW")
    return targets
