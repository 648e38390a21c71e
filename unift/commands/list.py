"""`unift list`: the model_type x peft_type support matrix."""

from __future__ import annotations

from dataclasses import dataclass

from unift.options import Options


@dataclass
class ListOptions(Options):
    pass


OPTIONS = ListOptions


def run(options: ListOptions) -> None:
    from unift.peft.support import support_table

    print(support_table())
