"""Commands that poll the controller for long (`get --watch`, `wait` once its stream broke) outlive
the controller going away for a while: a restart, a failover, a database outage, a network that
drops packets. A poll the controller does not serve (UNAVAILABLE: not reached, or it answered that
it cannot serve now; DEADLINE_EXCEEDED: no answer within `--rpc-timeout`, as on a connection that
died silently until keepalive gives it up; CANCELLED: the controller stopped while serving it) is
skipped; the outage is said once on stderr when it begins (what, since when, what the command does
meanwhile) and once when the controller answers again. Any other failure is the command's to
handle. The first call of a command is not made through here: a controller not there at the
start ends the command (exit 5).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from controller.cli.client import rpc_error_text, status_code
from controller.cli.context import Context

T = TypeVar("T")

OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          # a stopping controller cancels the calls still in flight after its grace
                          grpc.StatusCode.CANCELLED})


def clock(wall_time: float) -> str:
    """HH:MM:SS, local time (as `get --watch` stamps its lists)."""
    return time.strftime("%H:%M:%S", time.localtime(wall_time))


@dataclass
class Polls:
    """One command's polls: `command` begins its notes ("watch", "wait"), `meanwhile` says what it
    does during an outage ("polling again every 2s")."""

    ctx: Context
    command: str
    meanwhile: str
    down_since: float | None = None  # wall time the first unserved poll began, while unserved

    def poll(self, fetch: Callable[[], T], back: str = "") -> T | None:
        """What `fetch` returned, or None while the controller does not serve it; `back` is added
        to the note that it answers again."""
        began = time.time()
        try:
            got = fetch()
        except grpc.RpcError as exc:
            if status_code(exc) not in OUTAGE_CODES:
                raise
            if self.down_since is None:
                self.down_since = began
                said = rpc_error_text(exc, self.ctx.address).splitlines()[0].removeprefix("error: ")
                self.ctx.note(f"({self.command}: {said}; since {clock(began)}; {self.meanwhile})")
            return None
        if self.down_since is not None:
            self.ctx.note(f"({self.command}: the controller at {self.ctx.address} answers again, "
                          f"{time.time() - self.down_since:.0f}s after {clock(self.down_since)}{back})")
            self.down_since = None
        return got
