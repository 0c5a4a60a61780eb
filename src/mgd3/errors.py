"""The one exception type for bad input: the CLI prints it as a single line and exits 2."""


class Mgd3Error(Exception):
    """A user-facing error (bad input, missing file, unknown name). Message is one line."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line for a one-line error: its first line, with the first
    detail when that line only introduces a list ("Error(s) in loading state_dict:"), or the
    exception's type when it has no message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
