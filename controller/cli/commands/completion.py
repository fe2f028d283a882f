"""`maiactl completion bash|zsh`: a shell completion script generated from the parser (shtab).

    source <(maiactl completion bash)                 # bash, this shell
    maiactl completion zsh > "${fpath[1]}/_maiactl"   # zsh, then restart it
"""
from __future__ import annotations

import argparse

from controller.cli.context import Context

SHELLS = ("bash", "zsh")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("completion", help="print a bash or zsh completion script",
                       description="source <(maiactl completion bash), or for zsh: "
                                   "maiactl completion zsh > \"${fpath[1]}/_maiactl\"")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(handler=run, offline=True)


def run(args: argparse.Namespace, ctx: Context) -> int:
    import shtab

    from controller.cli.main import build_parser

    ctx.out(shtab.complete(build_parser(), shell=args.shell).rstrip("\n"))
    return 0
