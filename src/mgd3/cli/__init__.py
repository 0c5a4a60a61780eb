"""The `mgd3` command line: `mgd3 distill`, and the other stages' sub-commands.

Bad input is one line on stderr (`mgd3: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mgd3 import faults
from mgd3.version import __version__
from mgd3.errors import Mgd3Error, interrupted_message

log = logging.getLogger("mgd3")

# every sub-command: the module with its add_parser(subparsers) and run(args) -> int, in the order
# `mgd3 --help` lists them. Only the named command's module is imported (`build_parser`).
COMMANDS = {"distill": "mgd3.cli.distill", "pretrain": "mgd3.train.pretrain", "evaluate": "mgd3.cli.evaluate",
            "report": "mgd3.report", "finetune": "mgd3.train.finetune", "convert-ldm": "mgd3.train.convert"}


class Parser(argparse.ArgumentParser):
    """Usage errors are the house's one line too: `mgd3: error: ...` with where to find the usage, exit 2."""

    def error(self, message: str):
        self.exit(2, f"mgd3: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `mgd3` parser. When `argv` names a sub-command, only that command's module is imported
    and its parser built (a `distill` run does not load training, evaluation or report code);
    otherwise (no command, `--help`, a mistyped one) every command's, as `mgd3 --help` lists them."""
    parser = Parser(
        prog="mgd3", description="Training-free dataset distillation with pretrained diffusion models.")
    parser.add_argument("--version", action="version", version=f"mgd3 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = next((a for a in (argv or ()) if not a.startswith("-")), None)
    for command, name in COMMANDS.items():
        if named in COMMANDS and command != named:
            continue
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # that stage is not part of this build
            raise
        mod.add_parser(sub)
        if sub.choices[command].get_default("func") is None:
            sub.choices[command].set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, said by argparse)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mgd3: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except Mgd3Error as e:
        if not getattr(e, "reported", False):  # said already (another process of a torchrun launch)
            print(f"mgd3: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, OSError, RuntimeError) as e:  # a file fault or failed allocation no stage named (issue 32)
        line = faults.describe(e)
        if line is None:
            raise
        print(f"mgd3: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(args.command, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
