"""`python predict.py ...` = `unift predict ...` (kept under the original toolkit's script name)."""

import sys

from unift.cli import main

if __name__ == "__main__":
    sys.exit(main(command_name="predict"))
