"""`unift train` (uniform_finetune.py): fine-tune a model with a PEFT method. Its options are TrainArgs
(unift.train.args: the general flags plus every PEFT method's own); a --config YAML file gives defaults that
flags on the command line override."""

from __future__ import annotations

from unift.train.args import TrainArgs

OPTIONS = TrainArgs
CONFIG = True  # takes --config FILE.yaml


def run(options: TrainArgs) -> None:
    from unift.train.engines import leave_process_group
    from unift.train.run import train

    finished = False
    try:
        if options.plan:
            from unift.train.probe import plan_run

            plan_run(options)
        else:
            train(options)
        finished = True
    finally:
        leave_process_group(finished)
