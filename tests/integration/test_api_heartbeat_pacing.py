"""Heartbeat pacing over real gRPC with hand-driven agents: the interval a Register tells grows
with the connected nodes past `--max-heartbeats-per-second`, each stream is judged silent by
three of the intervals its agent was told (never by the shorter heartbeat timeout alone), and
connected agents are told the cluster's interval on their stream once it grew 1.5 times.

The pacing is the hub's, not the database's: SQLite alone."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from controller.api.server import ControllerApp
from grpc_harness import HandAgent, Stubs, controller_with_rack, eventually
from maia.v1 import admin_pb2, common_pb2

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"])


def _controller(db_url: str, tmp_path: Path, *, timeout_s: float,
                max_per_second: float) -> AbstractAsyncContextManager[tuple[ControllerApp, Stubs]]:
    return controller_with_rack(db_url, tmp_path, heartbeat_timeout_s=timeout_s,
                                max_heartbeats_per_second=max_per_second)


async def _joined(stubs: Stubs, node_id: str) -> tuple[HandAgent, int]:
    """A hand agent registered and connected (its first set read): the interval it was told."""
    agent = HandAgent(stubs, node_id, "rack-a")
    told = (await agent.register()).heartbeat_interval_ms
    await agent.connect()
    await agent.next_set()
    return agent, told


async def _suspect_events(stubs: Stubs, node_id: str) -> list[admin_pb2.EventRecord]:
    reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id=node_id))
    return [e for e in reply.events if e.kind == "node.suspect"]


@pytest.mark.parametrize(("max_per_second", "expected_ms"), [
    pytest.param(1.0, [1000, 2000, 3000], id="1 a second: one second a connected node"),
    pytest.param(2.0, [500, 1000, 1500], id="2 a second: half a second a connected node"),
    pytest.param(0.0, [333, 333, 333], id="no cap: a third of the timeout"),
    pytest.param(1000.0, [333, 333, 333], id="the default: a small cluster beats 3 times a timeout"),
])
async def test_the_interval_a_register_tells_grows_with_the_connected_nodes_and_the_cap(
        db_url: str, tmp_path: Path, max_per_second: float, expected_ms: list[int]) -> None:
    async with _controller(db_url, tmp_path, timeout_s=1.0, max_per_second=max_per_second) as (_, stubs):
        agents, told = [], []
        for i in range(3):
            agent, interval_ms = await _joined(stubs, f"node-{i}")
            agent.keep_beating(every_s=0.2)  # connected throughout (beating faster than told is fine)
            agents.append(agent)
            told.append(interval_ms)
        assert told == expected_ms
        for agent in agents:
            await agent.close()


async def test_a_node_beating_at_its_told_interval_is_never_marked_silent(db_url: str, tmp_path: Path) -> None:
    """Told 2 s (one node, half a heartbeat a second), it beats every 2 s: three times longer than
    the 0.6 s heartbeat timeout, never longer than its own 6 s."""
    async with _controller(db_url, tmp_path, timeout_s=0.6, max_per_second=0.5) as (_, stubs):
        agent, told_ms = await _joined(stubs, "node-1")
        assert told_ms == 2000
        agent.keep_beating(every_s=told_ms / 1000)
        watched_until = time.monotonic() + 2.5 * told_ms / 1000
        while time.monotonic() < watched_until:
            node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1"))
            assert node.connected and node.state == common_pb2.NODE_STATE_READY
            await asyncio.sleep(0.2)
        assert await _suspect_events(stubs, "node-1") == []
        await agent.close()


async def test_a_node_that_stops_is_marked_silent_by_its_own_timeout(db_url: str, tmp_path: Path) -> None:
    """Told 2 s, it beats twice and stops: its stream ends, the node suspect, for three of its own
    intervals of silence (6 s), not the 0.6 s heartbeat timeout."""
    async with _controller(db_url, tmp_path, timeout_s=0.6, max_per_second=0.5) as (_, stubs):
        agent, told_ms = await _joined(stubs, "node-1")
        agent.heartbeat(1, 500.0)
        await asyncio.sleep(told_ms / 1000)
        agent.heartbeat(2, 500.0)
        [suspect] = await eventually(lambda: _suspect_events(stubs, "node-1"), lambda events: len(events) == 1,
                                     timeout=30, what="node-1 suspect")
        # The hub's "no heartbeat for 6.1s (timeout 6s)", or the lifecycle's "no agent stream and no
        # heartbeat for 6s" when its pass came first, after the hub had ended the stream.
        silent = re.search(r"no heartbeat for (\d+(?:\.\d+)?)s", suspect.message)
        assert silent is not None and float(silent.group(1)) >= 5.5, suspect.message
        node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1"))
        assert not node.connected
        await agent.close()


async def test_connected_agents_are_told_the_grown_interval_and_judged_by_it(db_url: str, tmp_path: Path) -> None:
    """Two heartbeats a second: each node joining lengthens the cluster's interval by half a
    second. Connected agents are told it once it grew 1.5 times past the shortest one told (at the
    2nd and 3rd node, not the 4th). Agents that keep beating at their Register's interval (they
    ignore what they are told) stay connected; node-0, told 1.5 s, stops and is judged silent by
    4.5 s of silence, not by its Register's 1.5 s."""
    async with _controller(db_url, tmp_path, timeout_s=1.0, max_per_second=2.0) as (_, stubs):
        agents, told = [], []
        for i in range(4):
            agent, interval_ms = await _joined(stubs, f"node-{i}")
            agent.keep_beating(every_s=interval_ms / 1000)
            agents.append(agent)
            told.append(interval_ms)
        assert told == [500, 1000, 1500, 2000]
        await eventually(lambda: asyncio.sleep(0, [a.told_intervals_ms for a in agents]),
                         lambda pushed: pushed == [[1000, 1500], [1500], [], []], what="the grown intervals told")
        agents[0].stop_beating()
        [suspect] = await eventually(lambda: _suspect_events(stubs, "node-0"), lambda events: len(events) == 1,
                                     timeout=30, what="node-0 suspect")
        silent = re.search(r"no heartbeat for (\d+(?:\.\d+)?)s", suspect.message)
        assert silent is not None and float(silent.group(1)) >= 4.0, suspect.message
        for agent in agents[1:]:
            node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=agent.info.node_id))
            assert node.connected and await _suspect_events(stubs, agent.info.node_id) == []
        for agent in agents:
            await agent.close()
