"""`gridshed` command line: subcommands are registered by one module per concern.

Each module listed in COMMAND_MODULES has `register(subparsers, common)`; `common` is a parent
parser carrying the shared flags (--json). A handler returns an int exit code (or None = 0)
and raises UserError for anything the user can fix.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import UserError
from .output import error

COMMAND_MODULES = [
    "gridshed.cli.sim",
    "gridshed.cli.vboard",
    "gridshed.cli.events",
    "gridshed.cli.fleet",
    "gridshed.cli.board",
    "gridshed.cli.inventory",
    "gridshed.cli.security",
    "gridshed.cli.openadr",
    "gridshed.cli.meter",
    "gridshed.cli.market",
    "gridshed.cli.market_host",
    "gridshed.cli.exporter",
    "gridshed.cli.completion",
]

EPILOG = """examples:
  gridshed sim scenarios/ercot_ffr_dip.csv --site scenarios/demo-site.toml
  gridshed boards
  gridshed build --board esp32-devkitc-max3485
  gridshed deploy --board rpi-pico-w            (port auto-detected when one board is attached)
  gridshed provision --port /dev/ttyUSB0 --site site.toml --device-id site1-ctl1
  gridshed shed --device site1-ctl1 --port /dev/ttyUSB0 --expires 60s
run `gridshed COMMAND --help` for each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridshed",
        description="Flash, provision and drive gridshed load-shed controllers; simulate a whole site.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gridshed {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own --json default must not reset one given before it
    # (`gridshed inventory --json list`); main() sets False when it was given nowhere
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a command module not present in this build
            raise
        mod.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return int(rc or 0)
    except BrokenPipeError:
        # the reader went away (`gridshed meters | head`): stop quietly, as a Unix tool does;
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except UserError as exc:
        if args.debug:
            raise
        error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gridshed: interrupted", file=sys.stderr)
        return 130
