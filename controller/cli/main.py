"""maiactl entry point: argument parsing, dispatch and the one place errors become exit codes.

Exit codes are `client.Exit` (0 ok, 1 failed call, 2 bad usage/input, 3 not found, 4 partial,
5 unreachable). Errors go to stderr as `error: ...`, never tracebacks.
"""
from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import grpc

from controller.cli.bounds import non_empty, seconds
from controller.cli.client import CliError, Exit, exit_code_of, rpc_error_text
from controller.cli import commands
from controller.cli.config import ConfigError, Connection, resolve_connection
from controller.cli.context import OUTPUTS, Context
from controller.cli.manifests import ManifestError
from controller.pipes import quiet_stdout

MANIFEST_PROBLEMS_SHOWN = 20  # problems of bad manifests printed, then how many more there are

# Connection settings: flag name -> attribute, all resolved by config.resolve_connection.
_CONNECTION_FLAGS = {
    "--controller": ("controller", "HOST:PORT", "controller address, or several comma-separated (any one that "
                     "answers; docs/operations.md) ($MAIA_CONTROLLER, the context, 127.0.0.1:50051)"),
    "--context": ("context", "NAME", "config file context to use ($MAIA_CONTEXT, else current_context)"),
    "--token": ("token", "TOKEN", "bearer token sent with every call ($MAIA_TOKEN, the context)"),
    "--token-file": ("token_file", "FILE", "read the bearer token from FILE ($MAIA_TOKEN_FILE, the context)"),
    "--ca": ("ca", "FILE", "PEM CA bundle: connect with TLS ($MAIA_CA, the context)"),
    "--cert": ("cert", "FILE", "PEM client certificate for mutual TLS ($MAIA_CERT, the context)"),
    "--key": ("key", "FILE", "PEM private key of --cert ($MAIA_KEY, the context)"),
}


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Connection, output and timeout options, accepted both before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    for flag, (dest, metavar, text) in _CONNECTION_FLAGS.items():
        parent.add_argument(flag, dest=dest, metavar=metavar, default=default, type=non_empty, help=text)
    parent.add_argument("-o", "--output", choices=OUTPUTS, default=default,
                        help="output format: table (default), wide (more columns), json, yaml "
                             "(manifest vocabulary, re-appliable), name (kind/name per line, deployments as "
                             "deployment/TENANT/NAME: what by-name commands read back), csv (usage only)")
    parent.add_argument("--no-headers", action="store_true", default=default,
                        help="tables: leave out the header line")
    parent.add_argument("--rpc-timeout", type=seconds(), metavar="SECONDS", default=default,
                        help="deadline of each call to the controller in seconds (default: 15)")
    return parent


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """maiactl's parser, with every subcommand; with `command` (`command_of`), only the
    subcommands of the module that registers it: what parsing that command line needs."""
    parser = argparse.ArgumentParser(
        prog="maiactl", parents=[_common_options(suppress=False)],
        description="Operate a Maia scheduler controller: tenants, topology, deployments, nodes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options(suppress=True)
    for module in commands.modules(command):
        module.register(sub, common)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand word of `argv` as argparse will find it: the first word after the global
    options and their values. None when that is not certain (`-h`, an abbreviated or unknown
    option, `--`): the parser is then built with every subcommand, as argparse needs."""
    takes_value = {flag: action.nargs != 0 for action in _common_options(suppress=False)._actions
                   for flag in action.option_strings}
    words = iter(argv)
    for word in words:
        if not word.startswith("-"):
            return word
        flag, given, _ = word.partition("=")
        if flag not in takes_value:
            return None
        if takes_value[flag] and not given:
            next(words, None)
    return None


def _offline(args: argparse.Namespace) -> bool:
    """Whether the command calls no controller, and so works with a broken config (`config`,
    `solve`, `version --client`): its parser's `offline`, True or a test of its arguments."""
    offline = getattr(args, "offline", False)
    return bool(offline(args) if callable(offline) else offline)


# The positionals a command takes its names in, a list each (`get deployment a b`, `drain n1 n2`):
# names given after an option go there too; and the commands whose one NAME is a positional
# (elsewhere `name` is an option's: `token create --name`, which a stray word must not set).
_NAME_LISTS = ("names", "words", "nodes", "deployment", "ids")
_ONE_NAME = frozenset({"describe", "explain"})


def _take_late_names(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Names given after an option (`get deployment -n lab svc`, kubectl's habit): argparse matched
    the names' positional, empty, before the option, and left the names over ("unrecognized
    arguments: svc", exit 2, for every KIND NAME command). They go where the names go; anything
    else left over is the usage error `parse_args` makes of it."""
    words = [w for w in extra if not w.startswith("-") or w == "-"]
    if len(words) == len(extra):
        for dest in _NAME_LISTS:
            value = getattr(args, dest, None)
            if isinstance(value, list):
                value.extend(words)
                return
        if getattr(args, "command", None) in _ONE_NAME and getattr(args, "name", "") is None and len(words) == 1:
            args.name = words[0]
            return
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """maiactl's command line as its command reads it (exit 2 with the usage for a bad one)."""
    parser = build_parser(command_of(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        _take_late_names(parser, args, extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a lone surrogate JSON let into an id prints escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = parse(argv)
    if args.output == "csv" and not getattr(args, "csv_output", False):
        print(f"error: -o csv is not supported by {args.command}; it is for usage", file=sys.stderr)
        return Exit.USAGE
    try:
        connection = resolve_connection({dest: getattr(args, dest) for dest, _, _ in _CONNECTION_FLAGS.values()})
    except ConfigError as exc:
        if not _offline(args):
            print(f"error: {exc}", file=sys.stderr)
            return Exit.USAGE
        connection = Connection()  # never used: the command calls no controller
    ctx = Context(connection=connection, output=args.output or "table", no_headers=bool(args.no_headers),
                  rpc_timeout=15.0 if args.rpc_timeout is None else args.rpc_timeout)
    try:
        return int(args.handler(args, ctx) or 0)
    except ManifestError as exc:
        for problem in exc.problems[:MANIFEST_PROBLEMS_SHOWN]:
            ctx.note(f"error: {problem}")
        if len(exc.problems) > MANIFEST_PROBLEMS_SHOWN:  # a directory of other JSON printed hundreds
            ctx.note(f"error: ... and {len(exc.problems) - MANIFEST_PROBLEMS_SHOWN} more problems "
                     f"({len(exc.problems)} in all); fix these first")
        return Exit.USAGE
    except CliError as exc:
        ctx.note(f"error: {exc}")
        return exc.exit_code
    except grpc.RpcError as exc:
        ctx.note(rpc_error_text(exc, ctx.address))
        return exit_code_of(exc)
    except ConfigError as exc:
        ctx.note(f"error: {exc}")
        return Exit.USAGE
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return Exit.INTERRUPTED
    except BrokenPipeError:  # whoever read stdout stopped (controller/pipes.py)
        quiet_stdout()
        return Exit.BROKEN_PIPE
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
