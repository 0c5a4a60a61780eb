"""The one exception type for bad input: the CLI prints it as a single line and exits 2."""


class Mgd3Error(Exception):
    """A user-facing error (bad input, missing file, unknown name). Message is one line."""


RESUMING_COMMANDS = {  # what re-running the same command does after Ctrl-C
    "distill": "resumes: the finished batches are kept",
    "pretrain": "continues from the last checkpoint",
}


def interrupted_message(command: str | None, argv: list) -> str:
    """The one line after Ctrl-C: the command to re-run and what re-running it does."""
    import shlex

    again = "mgd3 " + shlex.join(str(a) for a in argv)
    if command in RESUMING_COMMANDS:
        return f"mgd3: interrupted; re-running the same command {RESUMING_COMMANDS[command]}: {again}"
    return f"mgd3: interrupted; to run it again: {again}"
