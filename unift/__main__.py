"""`python -m unift ...` = `unift ...`."""

import sys

from unift.cli import main

if __name__ == "__main__":
    sys.exit(main())
