"""`maiactl get --watch` and `maiactl wait` through a network that goes silent (no FIN, no RST: a
TCP proxy that drops what it reads) and comes back: the watch says so once and goes on once the
controller is reachable again, on a new connection; the one it had is dead for good, and only its
keepalive pings (`limits.CLIENT_KEEPALIVE`) give it up. The wait, whose stream broke, polls
through the outage and follows a new stream once a poll is served. A real `maiactl` process
against an in-process controller on real sockets; the pings are shortened for the test (as
`test_api_agent_keepalive` shortens the agents'), both sides: the controller permits pings every
100 ms."""
from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.config import Config
from grpc_harness import BlackholeProxy, admin_token_of, controller_with_rack, eventually, spec
from maia.v1 import admin_pb2, deployments_pb2

WAIT_S = 30.0  # a bound on each wait below, never reached when things work
# The controller (its `agent_keepalive`: the server side every client's pings must agree with).
SERVER = limits.Keepalive(client_time_ms=1000, server_time_ms=60_000, server_timeout_ms=20_000,
                          server_min_ping_interval_ms=100)
# ... also pinging each connection after 1 s of silence, given up 1 s later: the stream of a dead
# connection is ended (its watcher gone) within seconds, not after 70 s.
SERVER_PINGING = replace(SERVER, server_time_ms=1000, server_timeout_ms=1000)
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


async def _maiactl(proxy: BlackholeProxy, app: ControllerApp, *args: str) -> asyncio.subprocess.Process:
    """`maiactl` (its pings shortened) through `proxy`, each call given 1 s, its pipes to read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_")} | {"MAIA_CONFIG": os.devnull}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", MAIACTL, "--controller", proxy.address, "--token", admin_token_of(app),
        "--rpc-timeout", "1", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)


async def test_a_watch_whose_connection_died_silently_goes_on_once_the_controller_is_reachable(
        db_url: str, tmp_path: Path) -> None:
    async with controller_with_rack(db_url, tmp_path, agent_keepalive=SERVER) as (app, stubs), \
            BlackholeProxy(app.address) as proxy:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="before"))
        watch = await _maiactl(proxy, app, "get", "tenants", "--watch", "--interval", "0.2")
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


async def test_a_wait_whose_stream_broke_watches_again_once_the_controller_is_reachable(
        db_url: str, tmp_path: Path) -> None:
    """`wait deployment` follows WatchDeployments: the controller has a watcher. The network goes
    silent: the stream breaks (maiactl's pings), the wait polls through the outage, and the
    controller's own pings end the dead stream (no watcher). Once a poll is served the wait
    follows a new stream (a watcher again; it polled until --timeout before), and the delete
    that follows ends it."""
    async with controller_with_rack(db_url, tmp_path, agent_keepalive=SERVER_PINGING) as (app, stubs), \
            BlackholeProxy(app.address) as proxy:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("web")))
        before = app.bus.subscriber_count

        async def watchers() -> int:
            return app.bus.subscriber_count - before

        wait = await _maiactl(proxy, app, "wait", "deployment", "web", "-n", "lab", "--for", "deleted",
                              "--timeout", "120")
        assert wait.stdout is not None and wait.stderr is not None
        out, err = Lines(wait.stdout), Lines(wait.stderr)
        try:
            await err.until("lab/web: Pending")
            await eventually(watchers, lambda n: n == 1, timeout=WAIT_S, what="the wait's stream")
            proxy.go_silent()
            await err.until("(wait: UNAVAILABLE: cannot reach the controller")  # its polls meanwhile
            await eventually(watchers, lambda n: n == 0, timeout=WAIT_S, what="the dead stream ended")
            proxy.heal()
            back = await err.until("answers again")
            await eventually(watchers, lambda n: n == 1, timeout=WAIT_S, what="the wait's new stream")
            assert back.endswith("; watching again)"), back
            assert any(line.startswith("(watch broke: UNAVAILABLE") for line in err.seen), err.seen
            await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="web", tenant="lab"))
            await out.until("deployment/lab/web condition met (deleted)")
            assert await asyncio.wait_for(wait.wait(), WAIT_S) == 0
        finally:
            if wait.returncode is None:
                wait.terminate()
            await wait.wait()


def test_maiactls_pings_keep_twice_the_interval_the_controller_permits() -> None:
    """A ping sooner than the server's minimum after the last (no data between) is a strike, and
    two end the connection (GOAWAY too_many_pings): a watch idle between polls must stay clear."""
    served = Config().agent_keepalive  # the controller's server side (and the gateways', the same)
    assert 2 * served.server_min_ping_interval_ms <= limits.CLIENT_KEEPALIVE.client_time_ms
    assert dict(served.server_options())["grpc.keepalive_permit_without_calls"] == 1  # pings between polls
