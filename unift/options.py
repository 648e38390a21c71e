"""Options dataclasses -> command-line flags and YAML keys. Every command's options are a dataclass whose
fields carry their flag (name, aliases, type, range, choices, help) in `opt(...)`: the parser, the --config
file, the run card and the experiment files are generated from the same fields, so a flag is written once."""

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


def opt(default: Any = None, help: str = "", *, group: str | None = None, aliases: tuple[str, ...] = (),
        choices: Any = None, nargs: str | None = None, const: Any = None, check: Any = None,
        range: Range | None = None, flag: str | None = None, positional: bool = False, required: bool = False,
        negate: str | None = None, metavar: str | None = None, env: str | None = None,
        trainer: str | tuple[str, ...] = ()) -> Any:
    """A dataclass field that knows its flag.

    `check` validates a value and raises UniftError (it may return a normalised value); `range` bounds a
    number (checked when the options are built, before anything loads); `flag` names the flag when it is not
    `--FIELD` (the original toolkit's `--data` of generate is the field `run_data`); `positional` makes it an
    argument without a dash; `negate` gives a boolean a flag that turns it off (`--no_example`); `env` takes
    the default from an environment variable when the flags are built; `group` titles its --help section;
    `trainer` names the transformers TrainingArguments field(s) the value goes to unchanged."""
    caller = sys._getframe(1).f_code  # where the flag is written: one place per flag (tests/test_flags.py)
    meta = {"help": help, "group": group, "aliases": aliases, "choices": choices, "nargs": nargs,
            "const": const, "check": check, "range": range, "flag": flag, "positional": positional,
            "required": required, "negate": negate, "metavar": metavar, "env": env,
            "trainer": (trainer,) if isinstance(trainer, str) else tuple(trainer),
            "defined_in": f"{caller.co_filename}:{caller.co_qualname}"}
    return _field(default, meta)


def _field(default: Any, meta: dict[str, Any]) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def like(group: type, name: str, default: Any = dataclasses.MISSING, *, required: bool | None = None,
         trainer: str | None = None) -> Any:
    """The flag `name` as the option group `group` defines it, for a command that takes this flag of the group
    alone, or needs another default (train's --model_type is llama, where inference takes the run folder's)
    or needs it given (`required`), or sends it to a TrainingArguments field (`trainer`). Help, type, range
    and checks stay the group's one definition."""
    f = group.__dataclass_fields__[name]
    meta = dict(f.metadata)
    if required is not None:
        meta["required"] = required
    if trainer is not None:
        meta["trainer"] = (trainer,)
    return _field(default_of(f) if default is dataclasses.MISSING else default, meta)


def trainer_fields(options: Any) -> dict[str, Any]:
    """The TrainingArguments fields the options' flags set unchanged (`opt(..., trainer=NAME)`)."""
    return {name: getattr(options, f.name) for f in dataclasses.fields(options) for name in f.metadata.get("trainer", ())}


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh list for list defaults)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric flag; `also` lists extra allowed values (such as -1 for "no limit"), `exclude`
    values refused inside the bounds (such as 0 for a count that may be negative)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    also: tuple = ()
    exclude: tuple = ()

    def contains(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if value in self.also:
            return True
        if value in self.exclude:
            return False
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
        elif self.high is not None:
            text = f"{'<' if self.high_open else '≤'} {num(self.high)}"
        else:
            return " and ".join(f"≠ {num(x)}" for x in self.exclude)
        return text + "".join(f" or {num(x)}" for x in self.also) + "".join(f" and ≠ {num(x)}" for x in self.exclude)


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


def check_choices(args: Any) -> None:
    """Every choice-valued field holds one of its choices, however the options were built (argparse checks
    flags; a --config file, an experiment file or a caller are checked here)."""
    for f in dataclasses.fields(args):
        choices, value = f.metadata.get("choices"), getattr(args, f.name)
        if not choices or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                flag = f.metadata.get("flag") or f"--{f.name}"
                raise UniftError(f"{flag}: {item!r} is not one of {', '.join(map(str, choices))}")


@dataclass
class Options:
    """Base of every command's options: numbers are range-checked when the options are built, whether they
    came from flags, a --config file, an experiment file or a caller (argparse never sees YAML values)."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_choices(self)


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


def _wrap_check(scalar: Any, check: Any, bounds: Range | None = None) -> Any:
    """An argparse `type`: parse, range-check (`argument --top_p: must be in (0, 1] (got 0)`), then `check`."""
    def convert(text: str) -> Any:
        value = scalar(text)  # ValueError: argparse says "invalid int value"
        if bounds is not None and isinstance(value, (int, float)) and not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()} (got {value:g})")
        if check is not None:
            try:
                return check(value)
            except UniftError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        return value

    convert.__name__ = getattr(scalar, "__name__", "value")
    return convert


def add_arguments(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """One flag per field of the options dataclass `cls` (fields without flag metadata are skipped); fields
    without a group of their own go into `group` (default: the parser's general options)."""
    import os

    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue  # not a flag: set by code, not by the user
        title = meta.get("group") or group
        target = parser
        if title:
            target = groups.get(title)
            if target is None:
                target = groups[title] = parser.add_argument_group(f"{title} options")
        scalar, is_list = _flag_type(f.type)
        default = default_of(f)
        if meta.get("env"):
            default = os.environ.get(meta["env"], default)
        shown = meta.get("help", "") + (f" (default: {default})" if default not in (None, [], False, True) else "")
        if meta.get("env"):
            shown += f" (default: ${meta['env']})"
        if meta.get("positional"):
            target.add_argument(f.name, help=shown, metavar=meta.get("metavar"))
            continue
        names = [meta.get("flag") or f"--{f.name}", *meta.get("aliases", ())]
        if meta.get("negate"):
            target.add_argument(meta["negate"], dest=f.name, action="store_false", help=shown)
            continue
        if scalar is bool and not is_list:
            target.add_argument(*names, dest=f.name, nargs="?", const=True, default=default,
                                type=_parse_bool, help=shown)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": shown,
                                  "type": _wrap_check(scalar, meta.get("check"))}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("required"):
            kwargs["required"] = True
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if is_list:
            kwargs["nargs"] = "+"
        elif meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
            kwargs["const"] = meta.get("const")
        target.add_argument(*names, **kwargs)


def read_yaml(path: str, flag: str = "--config") -> dict[str, Any]:
    """A YAML mapping of option names to values, with one-line errors naming the file."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise UniftError(f"{flag} {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UniftError(f"{flag} {path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UniftError(f"{flag} {path}: expected a mapping of option names to values")
    return values


def checked_values(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Option values from a mapping (a --config file, an experiment's settings) checked as the flags would
    be: unknown keys are refused, each field's `check` runs (and may normalise the value)."""
    known = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UniftError(f"{where}: unknown option(s) {', '.join(unknown)}")
    checked = {}
    for key, value in values.items():
        check = known[key].metadata.get("check")
        checked[key] = check(value) if (check and value is not None) else value
    return checked


def load_yaml_defaults(path: str, cls: type) -> dict[str, Any]:
    """Values from a YAML --config file for the options `cls`; CLI flags override them."""
    return checked_values(cls, read_yaml(path), f"--config {path}")


def from_mapping(cls: type, values: dict[str, Any], where: str) -> Any:
    """Options built from a mapping, checked as flags are (experiments call the commands this way)."""
    return cls(**checked_values(cls, values, where))


def parse_into(cls: type, namespace: argparse.Namespace) -> Any:
    """The options dataclass from parsed flags (fields that are no flags keep their defaults)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(namespace, f.name)}
    return cls(**values)


def command_line() -> str:
    return " ".join(sys.argv)
