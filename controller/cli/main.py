"""maiactl entry point: argument parsing, dispatch and the one place errors become exit codes.

Exit codes: 0 success, 1 a failure reported by the controller (or a timeout), 2 bad input
(usage, malformed manifests or problems). Errors go to stderr as `error: ...`, never tracebacks.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from controller.cli.client import CliError, resolve_address, rpc_error_text
from controller.cli.commands import MODULES
from controller.cli.context import Context
from controller.cli.manifests import ManifestError


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--controller/-o/--rpc-timeout, accepted both before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--controller", metavar="HOST:PORT", default=default,
                        help="controller address (default: $MAIA_CONTROLLER or 127.0.0.1:50051)")
    parent.add_argument("-o", "--output", choices=("table", "json"), default=default,
                        help="output format (default: table)")
    parent.add_argument("--rpc-timeout", type=float, metavar="SECONDS", default=default,
                        help="deadline of each call to the controller (default: 15)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maiactl", parents=[_common_options(suppress=False)],
        description="Operate a Maia scheduler controller: tenants, topology, deployments, nodes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options(suppress=True)
    for module in MODULES:
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(address=resolve_address(args.controller), output=args.output or "table",
                  rpc_timeout=args.rpc_timeout or 15.0)
    try:
        return int(args.handler(args, ctx) or 0)
    except ManifestError as exc:
        for problem in exc.problems:
            ctx.note(f"error: {problem}")
        return 2
    except CliError as exc:
        ctx.note(f"error: {exc}")
        return exc.exit_code
    except grpc.RpcError as exc:
        ctx.note(rpc_error_text(exc, ctx.address))
        return 1
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
