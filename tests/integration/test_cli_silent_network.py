"""`maiactl get --watch` through a network that goes silent (no FIN, no RST: a TCP proxy that drops
what it reads) and comes back: the watch says so once and goes on once the controller is reachable
again, on a new connection; the one it had is dead for good, and only its keepalive pings
(`limits.CLIENT_KEEPALIVE`) give it up. A real `maiactl` process against an in-process controller
on real sockets; the pings are shortened for the test (as `test_api_agent_keepalive` shortens the
agents'), both sides: the controller permits pings every 100 ms."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from controller import limits
from controller.config import Config
from grpc_harness import BlackholeProxy, admin_token_of, controller_with_rack
from maia.v1 import admin_pb2

WAIT_S = 30.0  # a bound on each wait below, never reached when things work
# The controller (its `agent_keepalive`: the server side every client's pings must agree with).
SERVER = limits.Keepalive(client_time_ms=1000, server_time_ms=60_000, server_timeout_ms=20_000,
                          server_min_ping_interval_ms=100)
# maiactl, its pings after 1 s of silence, given up 1 s later (20 s and 10 s outside tests).
MAIACTL = ("import sys; from controller import limits; "
           "limits.CLIENT_KEEPALIVE = limits.Keepalive(client_time_ms=1000, client_timeout_ms=1000, "
           "server_min_ping_interval_ms=100); "
           "from controller.cli.main import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite alone: what is tested is the client's transport, the same on either database."""
    return f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"


class Lines:
    """What a process writes to one pipe, line by line as it comes."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self.seen: list[str] = []

    async def until(self, text: str) -> str:
        """The first line (seen or to come) holding `text`; AssertionError when the pipe ends first."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not any(text in line for line in self.seen):
                    line = await self._stream.readline()
                    assert line, f"{text!r} never came; the process ended after: {self.seen}"
                    self.seen.append(line.decode().rstrip("\n"))
        except TimeoutError:
            raise AssertionError(f"{text!r} did not come within {WAIT_S:g}s; seen: {self.seen}") from None
        return next(line for line in self.seen if text in line)


async def test_a_watch_whose_connection_died_silently_goes_on_once_the_controller_is_reachable(
        db_url: str, tmp_path: Path) -> None:
    async with controller_with_rack(db_url, tmp_path, agent_keepalive=SERVER) as (app, stubs), \
            BlackholeProxy(app.address) as proxy:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="before"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_")} | {"MAIA_CONFIG": os.devnull}
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MAIACTL, "--controller", proxy.address, "--token", admin_token_of(app),
            "--rpc-timeout", "1", "get", "tenants", "--watch", "--interval", "0.2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        assert watch.stdout is not None and watch.stderr is not None
        out, err = Lines(watch.stdout), Lines(watch.stderr)
        try:
            await out.until("before")
            proxy.go_silent()
            # A poll not answered within --rpc-timeout (or failed by the keepalive giving the
            # connection up first): said once, and the watch polls on.
            said = await err.until("(watch: ")
            assert said.startswith(("(watch: DEADLINE_EXCEEDED: the controller at", "(watch: UNAVAILABLE:")), said
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id="after"))  # not through the proxy
            proxy.heal()  # new connections get through; the old one stays dead
            await out.until("after")
            await err.until(f"the controller at {proxy.address} answers again")
            assert watch.returncode is None  # still watching
            assert sum(line.startswith("(watch: ") and "answers again" not in line for line in err.seen) == 1
        finally:
            if watch.returncode is None:
                watch.terminate()
            await watch.wait()


def test_maiactls_pings_keep_twice_the_interval_the_controller_permits() -> None:
    """A ping sooner than the server's minimum after the last (no data between) is a strike, and
    two end the connection (GOAWAY too_many_pings): a watch idle between polls must stay clear."""
    served = Config().agent_keepalive  # the controller's server side (and the gateways', the same)
    assert 2 * served.server_min_ping_interval_ms <= limits.CLIENT_KEEPALIVE.client_time_ms
    assert dict(served.server_options())["grpc.keepalive_permit_without_calls"] == 1  # pings between polls
