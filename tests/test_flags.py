"""One definition per flag: every options dataclass of every command (and every PEFT method's flags) takes a
shared flag from its option group (unift.models.flags), by inheritance or with `like(Group, name)`, never by
writing its own `opt(...)` for a name another class writes too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unift.models.flags import DataFlags, DecodingFlags, ModelFlags
from unift.options import Options, like, opt

# Flag names that mean different things in different commands, with the classes that may write them
HOMONYMS = {
    # experiment: which preset of the experiment file; elsewhere: named decoding settings
    "--preset": {"DecodingFlags", "ExperimentOptions"},
    # generate, chat, serve: find the run the original toolkit's `--data NAME` wrote; elsewhere: the datasets
    "--data": {"DataFlags", "FindRunOptions"},
}


def all_options_classes() -> set[type]:
    """Every command's options dataclass and the classes they are made of, and every method's flags."""
    from unift.cli import COMMANDS, command_module
    from unift.peft import METHODS

    roots = []
    for name in COMMANDS:
        module = command_module(name)
        actions = getattr(module, "SUBCOMMANDS", None)
        roots += [o for o, _, _, _ in actions.values()] if actions else [module.OPTIONS]
    from unift.train.stages import STAGES

    roots += [m.flags for m in METHODS.values() if m.flags] + [s.flags for s in STAGES.values() if s.flags]
    found: set[type] = set()
    for root in roots:
        found |= {c for c in root.__mro__ if dataclasses.is_dataclass(c)}
    # Options subclasses other tests define inside a function are theirs, not the product's
    return found | {c for c in Options.__subclasses__() if "<locals>" not in c.__qualname__}


def definitions(classes: set[type]) -> dict[str, dict[str, set[str]]]:
    """flag name -> where each definition of it is written -> the classes holding that definition."""
    found: dict[str, dict[str, set[str]]] = {}
    for cls in classes:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in cls.__dict__.get("__annotations__", {}):
            meta = fields[name].metadata if name in fields else {}
            if "help" not in meta:
                continue
            flag = name if meta.get("positional") else meta.get("flag") or f"--{name}"
            found.setdefault(flag, {}).setdefault(meta["defined_in"], set()).add(cls.__qualname__)
    return found


def twice(found: dict[str, dict[str, set[str]]]) -> dict[str, list[str]]:
    """Flags written in more than one place (a homonym only by the classes allowed to)."""
    wrong = {}
    for flag, places in found.items():
        if len(places) < 2:
            continue
        writers = {place.rsplit(":", 1)[1].split(".")[-1] for place in places}
        if writers != HOMONYMS.get(flag):
            wrong[flag] = sorted(places)
    return wrong


def test_the_check_sees_a_flag_written_twice_and_not_one_taken_with_like():
    @dataclass
    class A(Options):
        cutoff_len: int = opt(512, "tokens")

    @dataclass
    class B(Options):
        cutoff_len: int = opt(1024, "tokens")

    @dataclass
    class C(Options):
        max_samples: int | None = like(DataFlags, "max_samples", 5)

    assert set(twice(definitions({A, B}))) == {"--cutoff_len"}
    assert twice(definitions({C, DataFlags})) == {}


def test_every_flag_is_written_once():
    assert twice(definitions(all_options_classes())) == {}


def test_like_keeps_the_groups_definition_and_changes_only_what_it_says():
    from unift.commands.chat import ChatOptions
    from unift.commands.merge import MergeOptions
    from unift.train.args import RunArgs

    def field(cls: type, name: str) -> dataclasses.Field:
        return {f.name: f for f in dataclasses.fields(cls)}[name]

    for cls, group, name, default in [(RunArgs, ModelFlags, "model_type", "llama"),
                                      (RunArgs, DataFlags, "cutoff_len", 512),
                                      (ChatOptions, DecodingFlags, "preset", "chat")]:
        mine, theirs = field(cls, name), field(group, name)
        assert mine.default == default != theirs.default
        assert dict(mine.metadata) == dict(theirs.metadata)  # help, range, checks, group: the one definition
    required = field(MergeOptions, "adapter_dir")
    assert required.metadata["required"] and not field(ModelFlags, "adapter_dir").metadata["required"]
    assert {k: v for k, v in required.metadata.items() if k != "required"} == {
        k: v for k, v in field(ModelFlags, "adapter_dir").metadata.items() if k != "required"}


def test_the_flags_passed_to_training_arguments_are_its_current_fields(tmp_path):
    """Every `opt(..., trainer=NAME)` names a TrainingArguments field by its current name: a deprecated alias
    (transformers 5.23 renamed gradient_checkpointing to activation_checkpointing) would print a FutureWarning
    into every run's log."""
    import warnings

    from transformers import TrainingArguments

    from unift.options import trainer_fields
    from unift.train.args import TrainArgs

    passed = trainer_fields(TrainArgs(output_dir=str(tmp_path)))
    assert "activation_checkpointing" in passed and passed.keys() <= {f.name for f in dataclasses.fields(TrainingArguments)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingArguments(use_cpu=True, **passed)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
