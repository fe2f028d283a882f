"""HTTP/2 keepalive on agent streams over real sockets (`limits.Keepalive`): the controller
tolerates the pings agents send at the interval it permits, counts pings sooner than that as
abuse, and ends the stream of a peer whose connection went silent (no FIN, no RST) long before
the heartbeat timeout would."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.bearer import aio_channel
from grpc_harness import BlackholeProxy, HandAgent, Stubs, admin_token_of, controller_with_rack, eventually
from maia.v1 import admin_pb2, common_pb2

# Long enough that the hub never ends a silent stream while these tests watch it: whatever ends
# a stream here is the transport.
HEARTBEAT_TIMEOUT_S = 120.0
# Test intervals: agents ping every 0.2 s, the controller accepts a ping every 0.1 s.
SHORT = limits.Keepalive(client_time_ms=200, client_timeout_ms=10_000, server_time_ms=60_000,
                         server_timeout_ms=20_000, server_min_ping_interval_ms=100)
IDLE_S = 2.0  # ten agent keepalive intervals without a message either way


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite alone: what is tested is the transport, the same on either database."""
    return f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"


def _controller(db_url: str, tmp_path: Path,
                keepalive: limits.Keepalive) -> contextlib.AbstractAsyncContextManager[tuple[ControllerApp, Stubs]]:
    return controller_with_rack(db_url, tmp_path, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, agent_keepalive=keepalive)


async def _connected(stubs: Stubs) -> bool:
    return (await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1"))).connected


async def _agent_on(address: str, app: ControllerApp, options: tuple[tuple[str, int], ...]) -> HandAgent:
    """node-1 registered and its stream open (its first set received) on a channel of its own."""
    channel = aio_channel(address, admin_token_of(app), options=(*limits.GRPC_CLIENT_OPTIONS, *options))
    agent = HandAgent(Stubs.on(channel), "node-1", "rack-a")
    await agent.register()
    await agent.connect()
    await agent.next_set()
    return agent


@pytest.mark.parametrize("server_min_ping_interval_ms, tolerated", [
    (SHORT.server_min_ping_interval_ms, True),   # the settings agree
    (5_000, False),                              # the server permits fewer pings than the agent sends
], ids=["agreeing", "server-stricter"])
async def test_an_idle_agent_streams_keepalive_pings_are_tolerated_at_the_permitted_interval(
        db_url: str, tmp_path: Path, server_min_ping_interval_ms: int, tolerated: bool):
    server = limits.Keepalive(client_time_ms=max(SHORT.client_time_ms, server_min_ping_interval_ms),
                              server_time_ms=SHORT.server_time_ms, server_timeout_ms=SHORT.server_timeout_ms,
                              server_min_ping_interval_ms=server_min_ping_interval_ms)
    async with _controller(db_url, tmp_path, server) as (app, stubs):
        agent = await _agent_on(app.address, app, SHORT.client_options())
        assert agent.call is not None
        await asyncio.sleep(IDLE_S)  # nothing sent either way: only the agent's pings cross
        if tolerated:
            assert not agent.call.done()
            assert await _connected(stubs)
            agent.heartbeat(1, 600.0)  # the stream still carries messages
            await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                             lambda n: n.power_draw_w == 600.0, what="heartbeat written")
        else:  # the same pings are abuse to a stricter server: GOAWAY too_many_pings ends the stream
            error = await agent.reader_error()
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
            assert "ping" in (error.details() or "").lower()
            await eventually(lambda: _connected(stubs), lambda connected: not connected, what="stream ended")
        await agent.close()
        await agent.stubs.channel.close()


async def test_a_silent_peer_is_found_by_the_controllers_keepalive_before_the_heartbeat_timeout(
        db_url: str, tmp_path: Path):
    keepalive = limits.Keepalive(client_time_ms=SHORT.client_time_ms, server_time_ms=300, server_timeout_ms=700,
                                 server_min_ping_interval_ms=SHORT.server_min_ping_interval_ms)
    async with _controller(db_url, tmp_path, keepalive) as (app, stubs), BlackholeProxy(app.address) as proxy:
        agent = await _agent_on(proxy.address, app, ())  # the agent pings nothing: the controller finds it
        assert await _connected(stubs)
        proxy.go_silent()
        # Well inside the heartbeat timeout (120 s): the unanswered ping ended the transport.
        await eventually(lambda: _connected(stubs), lambda connected: not connected,
                         timeout=HEARTBEAT_TIMEOUT_S / 4, what="the silent agent's stream ended")
        await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),  # as when a stream drops
                         lambda n: n.state in (common_pb2.NODE_STATE_SUSPECT, common_pb2.NODE_STATE_DOWN),
                         what="node-1 no longer ready")
        await agent.close()
        await agent.stubs.channel.close()


def test_keepalive_values_the_controller_would_count_as_too_many_pings_are_refused():
    with pytest.raises(ValueError, match="too many pings"):
        limits.Keepalive(client_time_ms=5_000, server_min_ping_interval_ms=10_000)
    # The defaults leave agents a 2x margin under the server's minimum (docs/security.md).
    assert 2 * limits.AGENT_KEEPALIVE.server_min_ping_interval_ms <= limits.AGENT_KEEPALIVE.client_time_ms
