"""The one exception type for bad input: the CLI prints it as a single line and exits 2."""


class Mgd3Error(Exception):
    """A user-facing error (bad input, missing file, unknown name). Message is one line."""
