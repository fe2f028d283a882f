"""Commands that act on several objects try every one and report each (`maiactl delete`, `token
revoke`, `cordon`, `uncordon`, `drain`, `node reset-credential`): one that fails is said on
stderr and the others are still tried (a typo among leaked tokens to revoke left the ones after
it live, with no word of them), and the exit code is the code of their failure when all failed
alike (3 NOT_FOUND, 2 INVALID_ARGUMENT), else 1. A controller that cannot be reached ends the
command at once: nothing else would work either (one clear message from main)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc

from controller.cli.client import Exit, exit_code_of, rpc_error_text, status_code
from controller.cli.context import Context

T = TypeVar("T")
R = TypeVar("R")


def combined_exit(failures: Iterable[int]) -> int:
    """The exit code of a command whose calls failed with these codes (none: 0)."""
    codes = set(failures)
    if not codes:
        return Exit.OK
    return codes.pop() if len(codes) == 1 else Exit.FAILED


def try_each(items: Iterable[T], call: Callable[[T], R], ctx: Context, ref: Callable[[T], str]) -> tuple[list[R], int]:
    """`call(item)` for every item, in order; a failed one noted on stderr (`ref` names it) and the
    rest tried. What the calls that succeeded returned, and the command's exit code."""
    done: list[R] = []
    failures: list[int] = []
    for item in items:
        try:
            done.append(call(item))
        except grpc.RpcError as exc:
            if status_code(exc) == grpc.StatusCode.UNAVAILABLE:
                raise
            ctx.note(f"{ref(item)} failed: {rpc_error_text(exc, ctx.address).removeprefix('error: ')}")
            failures.append(exit_code_of(exc))
    return done, combined_exit(failures)
