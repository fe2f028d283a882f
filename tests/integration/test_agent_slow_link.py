"""An agent (`simnode.transport.SimulatedNode`) reaches a live controller over a slow link at its
first attempt: its channel gives a connection attempt `limits.AGENT_CONNECT_TIMEOUT_MS`, where
250 ms failed every first attempt through a link holding each read 300 ms (the TCP and HTTP/2
handshakes take several reads), so the agent's first Register failed UNAVAILABLE. Real sockets:
an in-process controller behind `BlackholeProxy(delay_s=...)`, the agent in-process."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from controller import limits
from controller.simnode.protocol import NodeSpec
from controller.simnode.transport import REGISTER_TIMEOUT_S, SimulatedNode
from grpc_harness import BlackholeProxy, controller_with_rack, eventually, issue_token

LINK_DELAY_S = 0.3  # each read held this long: a link of ~600 ms round trip


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite alone: what is tested is the agent's transport, the same on either database."""
    return f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"


async def test_an_agent_registers_over_a_slow_link_at_its_first_attempt(db_url: str, tmp_path: Path) -> None:
    async with controller_with_rack(db_url, tmp_path) as (app, _), \
            BlackholeProxy(app.address, delay_s=LINK_DELAY_S) as link:
        token = await issue_token(app.db, "node-bootstrap", name="slow-link")
        node = SimulatedNode(NodeSpec("rack-a-n00", "rack-a"), link.address, token=token, load_delay_s=0.0)
        task = asyncio.create_task(node.run())
        try:
            async def connected() -> bool:
                return node.connected

            await eventually(connected, bool, timeout=60, what="the agent connected over the slow link")
        finally:
            node.stop()
            await asyncio.wait_for(task, timeout=30)
        assert node.register_failures == Counter()  # 250 ms: UNAVAILABLE, "connection attempt timed out"


def test_an_agent_fails_over_from_a_silent_controller_before_its_register_times_out() -> None:
    """A controller where nothing answers (a host down or cut off) fails the Register UNAVAILABLE
    once the connection attempt times out, and the agent tries the next controller; a Register
    that timed out first (DEADLINE_EXCEEDED) would keep it on that one (`SimulatedNode._follow`)."""
    assert limits.AGENT_CONNECT_TIMEOUT_MS / 1000 < REGISTER_TIMEOUT_S
    assert dict(limits.GRPC_FAILOVER_OPTIONS)["grpc.min_reconnect_backoff_ms"] == limits.AGENT_CONNECT_TIMEOUT_MS
