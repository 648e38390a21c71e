"""python -m unift.train.stages: print the stage x method table; --update-readme rewrites the README's copy."""

import sys
from pathlib import Path

from unift.peft.support import replace_between
from unift.train.stages import README_END, README_START, stage_table

if sys.argv[1:] == ["--update-readme"]:
    changed = replace_between(Path("README.md"), README_START, README_END, stage_table())
    print(f"README.md: {'updated' if changed else 'already up to date'}")
else:
    print(stage_table())
