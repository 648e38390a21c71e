"""--reward_funcs of --stage grpo: the built-in rewards, your own from a Python file, or a reward model.

A reward function takes the batch as keyword lists, one entry per completion, and returns one number per
completion (None: no opinion, left out of the mean):

    def my_reward(completions: list[str], reference: list[str], prompts: list[str], **kwargs) -> list[float]

`completions` are the generated answers (text, special tokens removed), `prompts` the rendered prompts,
`reference` the record's reference answer (alpaca `output`, the last assistant turn of a conversation, or
the column dataset_info.json maps to `response`). TRL adds more keywords (`completion_ids`,
`trainer_state`, ...), hence `**kwargs`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unift.data.answers import ANSWER, answer_line, last_number
from unift.errors import UniftError

RewardFunc = Callable[..., list]


def final_answer(text: str) -> str:
    """The value a reward compares: the `Answer:` line's value where there is one, else the last number."""
    return answer_line(text) if ANSWER.search(text) else last_number(text)


def exact_answer(completions: Sequence[str], reference: Sequence[str], **_: Any) -> list[float]:
    """1 where the completion's final answer equals the reference's, else 0."""
    out = []
    for text, ref in zip(completions, reference, strict=True):
        wanted = final_answer(ref)
        out.append(float(bool(wanted) and final_answer(text) == wanted))
    return out


def _answer_pattern(reference: str) -> re.Pattern | None:
    """The reference's last line with its values made wildcards: the shape an answer should end with."""
    lines = [line.strip() for line in reference.strip().splitlines() if line.strip()]
    if not lines:
        return None
    marker = ANSWER.search(lines[-1])
    if marker:  # "Answer: 42" -> an Answer: line with one value
        return re.compile(re.escape(lines[-1][: marker.start(1)].strip()) + r"\s*\S+\s*$")
    return None


def format_reward(completions: Sequence[str], reference: Sequence[str], **_: Any) -> list[float]:
    """1 where the completion ends the way the reference does (its final `Answer: VALUE` line, once, at the
    end), 0.5 where the line is there but not last, or repeated; 0 otherwise. A reference with no answer
    line asks only that the completion is not empty."""
    out = []
    for text, ref in zip(completions, reference, strict=True):
        pattern = _answer_pattern(ref)
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if pattern is None:
            out.append(float(bool(lines)))
            continue
        hits = [i for i, line in enumerate(lines) if pattern.fullmatch(line)]
        out.append(1.0 if hits == [len(lines) - 1] else 0.5 if hits else 0.0)
    return out


def length_reward(completions: Sequence[str], reference: Sequence[str], **_: Any) -> list[float]:
    """1 minus the completion's relative length difference from the reference (characters), floored at 0:
    a nudge against rambling (and against empty answers)."""
    return [max(0.0, 1.0 - abs(len(text) - len(ref)) / max(len(ref), 1))
            for text, ref in zip(completions, reference, strict=True)]


BUILT_IN: dict[str, RewardFunc] = {"exact_answer": exact_answer, "format": format_reward, "length": length_reward}


def _from_file(spec: str) -> RewardFunc:
    path, _, name = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise UniftError(f"--reward_funcs {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"unift_rewards_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any error in it is theirs, named in one line
        raise UniftError(f"--reward_funcs {spec}: {path} failed to import ({type(err).__name__}: {err})") from None
    func = getattr(module, name, None)
    if func is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UniftError(f"--reward_funcs {spec}: {path} has no function {name!r}"
                         + (f" (it has {', '.join(found)})" if found else ""))
    if not callable(func):
        raise UniftError(f"--reward_funcs {spec}: {name!r} in {path} is not a function")
    return func


def is_reward_model(spec: str) -> bool:
    """A --stage rm run folder (scored by its model) rather than a function."""
    from unift.models.runcard import RUN_CARD, RunCard

    folder = Path(spec)
    return folder.is_dir() and (folder / RUN_CARD).exists() and RunCard.load(folder).stage == "rm"


def check_reward_spec(spec: str) -> None:
    """Parse-time: a built-in name, FILE.py:FUNCTION (loaded to check), or a reward model's run folder."""
    if spec in BUILT_IN:
        return
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        _from_file(spec)
        return
    if Path(spec).is_dir():
        if not is_reward_model(spec):
            raise UniftError(f"--reward_funcs {spec}: a folder must be a --stage rm run (a reward model)")
        return
    raise UniftError(f"--reward_funcs {spec!r}: not a built-in reward ({', '.join(BUILT_IN)}), a FILE.py:FUNCTION "
                     "or a --stage rm run folder")


def checked(func: RewardFunc, name: str) -> RewardFunc:
    """The user's function, with what it returns checked: one number (or None) per completion."""
    def run(*args: Any, completions: Sequence[str], **kwargs: Any) -> list:
        result = func(*args, completions=completions, **kwargs)
        if isinstance(result, (str, bytes)) or not isinstance(result, Sequence) and not hasattr(result, "tolist"):
            raise UniftError(f"reward function {name} returned {type(result).__name__}; it must return a list of "
                             f"numbers, one per completion ({len(completions)})")
        values = result.tolist() if hasattr(result, "tolist") else list(result)
        if len(values) != len(completions):
            raise UniftError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                             "completions; it must return one per completion")
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise UniftError(f"reward function {name} returned {value!r}; rewards are numbers (or None)")
        return values

    run.__name__ = name
    return run


def reward_function(spec: str) -> RewardFunc:
    """The callable a --reward_funcs entry names (reward models are loaded by the stage, not here)."""
    if spec in BUILT_IN:
        func = BUILT_IN[spec]
        named = lambda *a, _f=func, **k: _f(*a, **k)  # noqa: E731 (TRL names a reward by __name__)
        named.__name__ = spec
        return named
    return checked(_from_file(spec), spec.rpartition(":")[2])
