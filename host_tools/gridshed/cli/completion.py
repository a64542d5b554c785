"""`gridshed completion bash|zsh`: a shell completion script made from the CLI's own parser."""
from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  gridshed completion bash > ~/.local/share/bash-completion/completions/gridshed
  gridshed completion zsh > ~/.zfunc/_gridshed      (with fpath+=~/.zfunc before compinit)
  eval "$(gridshed completion bash)"                 (this shell only)"""


def run_completion(args: argparse.Namespace) -> int:
    import shtab

    from . import build_parser

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("completion", help="print a bash or zsh completion script",
                       description="Print a completion script for every gridshed command and option "
                                   "(generated from the parser, so it never drifts from --help).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")
    p.set_defaults(func=run_completion)
