"""One module per `unift` command: its options dataclass (the flags are generated from it) and its run."""
