"""The one exception type that reaches users as a single clear line (tracebacks only with --debug)."""


class UniftError(Exception):
    """A problem the user can fix: bad flag, bad data record, missing file, unsupported combination."""
