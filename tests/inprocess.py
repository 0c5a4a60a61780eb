"""Run the `mgd3` CLI's main() in this process (no interpreter start-up, no re-import of torch
and diffusers): what a subprocess would see, as a CompletedProcess-like result."""

from types import SimpleNamespace

from mgd3.cli import main


def run_main(capsys, *args) -> SimpleNamespace:
    """main([...]) with `args` as strings; returncode (argparse's SystemExit included), stdout,
    stderr as captured by pytest's `capsys`. An exception that main() lets through fails the test,
    as a traceback would fail the subprocess check."""
    capsys.readouterr()  # drop what the test printed before
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
