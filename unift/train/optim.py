"""--optim, --optim_args and --lr_scheduler_type: transformers' own optimizer and schedule names, checked when
the arguments are built (a wrong name, or an optimizer whose library is missing, fails in one line before
any model loads, not in TrainingArguments after it).

Measured on a CPU with torch 2.13, transformers 5.24, bitsandbytes 0.50.2: adamw_torch, adamw_torch_fused,
adafactor, sgd, adagrad, rmsprop and bitsandbytes' adamw_8bit, paged_adamw_8bit, paged_adamw_32bit,
lion_8bit/32bit, ademamix(_8bit), rmsprop_bnb_8bit all step a model (bitsandbytes has a CPU backend; "paged"
changes nothing there). The others need libraries that are not installed here; they are refused with the
package to install."""

from __future__ import annotations

import importlib.util

from unift.errors import UniftError

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
)
# Optimizers whose transformers builder needs --optim_target_modules, which unift does not offer (GaLore and
# APOLLO could not be installed and tried here).
TARGETED = ("galore_", "apollo_")
# The --optim_args keys transformers reads for these optimizers; () = none (their settings are other flags)
ARGS_READ: dict[str, tuple[str, ...]] = {
    "adamw_torch": (), "adamw_torch_fused": (), "adafactor": (), "adamw_bnb_8bit": (), "adamw_8bit": (),
    "paged_adamw_8bit": (), "paged_adamw_32bit": (), "lion_8bit": (), "lion_32bit": (), "paged_lion_8bit": (),
    "paged_lion_32bit": (),
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "weight_decay", "centered"),
}


def optimizer_names() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


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
        hint = " (BAdam is not one of transformers' optimizers)" if "badam" in value.lower() else ""
        raise UniftError(f"unknown --optim {value!r}{hint}; known: {', '.join(optimizer_names())}")
    for prefixes, module, package in NEEDS:
        if value.startswith(prefixes):
            if importlib.util.find_spec(module) is None:
                raise UniftError(f"--optim {value} needs the {package} package, which is not installed "
                                 f"(pip install {package.split()[0]})")
            break
    if value.startswith(TARGETED):
        raise UniftError(f"--optim {value} needs transformers' optim_target_modules, which unift does not pass yet")
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
