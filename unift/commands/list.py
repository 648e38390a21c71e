"""`unift list`: the model_type x peft_type support matrix, and the stage x peft_type one."""

from __future__ import annotations

from dataclasses import dataclass

from unift.options import Options


@dataclass
class ListOptions(Options):
    pass


OPTIONS = ListOptions


def run(options: ListOptions) -> None:
    from unift.peft.support import support_table
    from unift.train.stages import stage_table

    print(support_table() + "\n\n" + stage_table())
