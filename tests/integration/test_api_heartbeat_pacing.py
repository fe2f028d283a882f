"""Heartbeat pacing over real gRPC with hand-driven agents: the interval a Register tells grows
with the connected nodes past `--max-heartbeats-per-second`, each stream is judged silent by
three of the intervals its agent was told (never by the shorter heartbeat timeout alone), and
connected agents are told the cluster's interval on their stream once it grew 1.5 times.

The pacing is the hub's, not the database's: SQLite alone. The controllers here run on short
timeouts and caps (a tenth of a second, a few heartbeats a second) so that a silence is a second
or two, not six; the silences are measured from the test's own last heartbeat to the moment the
agent's stream ended (the stream's end is the event waited on, not a poll), a lower bound that a
stream cut early cannot pass however loaded the machine. What keeps the scale from shrinking
further: the hub looks for silent streams after each flush (every 0.2 s) and ends one found silent
at two checks in a row, so a heartbeat timeout is caught only in a gap of beats well past it."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest

from controller.api.server import ControllerApp
from grpc_harness import HandAgent, Stubs, controller_with_rack, eventually
from maia.v1 import admin_pb2, common_pb2

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"])

# How long past a stream's silence timeout a test waits for its end before it fails: the hub
# ends a silent stream within two of its checks (about half a second); this is for a loaded machine.
ENDED_WITHIN_S = 15.0


def _controller(migrated_db_url: str, tmp_path: Path, *, timeout_s: float,
                max_per_second: float) -> AbstractAsyncContextManager[tuple[ControllerApp, Stubs]]:
    return controller_with_rack(migrated_db_url, tmp_path, heartbeat_timeout_s=timeout_s,
                                max_heartbeats_per_second=max_per_second)


async def _joined(stubs: Stubs, node_id: str) -> tuple[HandAgent, int]:
    """A hand agent registered and connected (its first set read): the interval it was told."""
    agent = HandAgent(stubs, node_id, "rack-a")
    told = (await agent.register()).heartbeat_interval_ms
    await agent.connect()
    await agent.next_set()
    return agent, told


async def _all_joined(stubs: Stubs, node_ids: list[str]) -> tuple[list[HandAgent], list[int]]:
    """Hand agents registered and connected one after the other, each beating at the interval its
    Register told (ignoring any it is told later), with those intervals."""
    agents, told = [], []
    for node_id in node_ids:
        agent, interval_ms = await _joined(stubs, node_id)
        agent.keep_beating(every_s=interval_ms / 1000)
        agents.append(agent)
        told.append(interval_ms)
    return agents, told


class _StreamEnd:
    """When an agent's Connect stream ended (the controller cut it): the call's done callback."""

    def __init__(self, agent: HandAgent) -> None:
        assert agent.call is not None, "the agent is not connected"
        self.at: float | None = None  # time.monotonic() at the end
        self._ended = asyncio.Event()
        agent.call.add_done_callback(self._done)

    def _done(self, _call: grpc.aio.Call) -> None:
        self.at = time.monotonic()
        self._ended.set()

    async def within(self, seconds: float) -> bool:
        """Whether the stream ends within `seconds` (waits no longer than it takes)."""
        try:
            await asyncio.wait_for(self._ended.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def silent_since(self, last_beat: float) -> float:
        """Seconds from `last_beat` (a time.monotonic() reading) to the stream's end."""
        assert self.at is not None, "the stream has not ended"
        return self.at - last_beat


def _last_beat(agent: HandAgent, seq: int) -> float:
    """One heartbeat, the agent's last (its beating stopped): when it was sent. The hub hears it
    later, so a stream judged by a silence timeout ends at least that long after."""
    agent.stop_beating()
    agent.heartbeat(seq, 500.0)
    return time.monotonic()


async def _suspect_events(stubs: Stubs, node_id: str) -> list[admin_pb2.EventRecord]:
    reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id=node_id))
    return [e for e in reply.events if e.kind == "node.suspect"]


async def _silent_suspect(stubs: Stubs, node_id: str, silence_timeout_s: float) -> None:
    """The node is disconnected and suspect for a silence of its timeout at least: the hub's "no
    heartbeat for 1.6s (timeout 1.5s)", or the lifecycle's "no agent stream and no heartbeat for
    2s" (whole seconds: rounded) when its pass came after the hub had ended the stream."""
    [suspect] = await eventually(lambda: _suspect_events(stubs, node_id), lambda events: len(events) == 1,
                                 timeout=ENDED_WITHIN_S, what=f"{node_id} suspect")
    silent = re.search(r"no heartbeat for (\d+(?:\.\d+)?)s", suspect.message)
    assert silent is not None, suspect.message
    rounding = 0.5 if "no agent stream" in suspect.message else 0.05
    assert float(silent.group(1)) >= silence_timeout_s - rounding, suspect.message
    node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=node_id))
    assert not node.connected


@pytest.mark.parametrize(("max_per_second", "expected_ms"), [
    pytest.param(1.0, [1000, 2000, 3000], id="1 a second: one second a connected node"),
    pytest.param(2.0, [500, 1000, 1500], id="2 a second: half a second a connected node"),
    pytest.param(0.0, [333, 333, 333], id="no cap: a third of the timeout"),
    pytest.param(1000.0, [333, 333, 333], id="the default: a small cluster beats 3 times a timeout"),
])
async def test_the_interval_a_register_tells_grows_with_the_connected_nodes_and_the_cap(
        migrated_db_url: str, tmp_path: Path, max_per_second: float, expected_ms: list[int]) -> None:
    async with _controller(migrated_db_url, tmp_path, timeout_s=1.0, max_per_second=max_per_second) as (_, stubs):
        agents, told = [], []
        for i in range(3):
            agent, interval_ms = await _joined(stubs, f"node-{i}")
            agent.keep_beating(every_s=0.2)  # connected throughout (beating faster than told is fine)
            agents.append(agent)
            told.append(interval_ms)
        assert told == expected_ms
        for agent in agents:
            await agent.close()


async def test_a_node_beating_at_its_told_interval_is_never_marked_silent(migrated_db_url: str, tmp_path: Path) -> None:
    """Told 1 s (one node, one heartbeat a second), it beats every second: ten times longer than
    the 0.1 s heartbeat timeout (a stream judged by it ends in the first gap), never longer than
    its own 3 s. Its stream lives through two and a half of its intervals."""
    async with _controller(migrated_db_url, tmp_path, timeout_s=0.1, max_per_second=1.0) as (_, stubs):
        agent, told_ms = await _joined(stubs, "node-1")
        assert told_ms == 1000
        end = _StreamEnd(agent)
        agent.keep_beating(every_s=told_ms / 1000)
        assert not await end.within(2.5 * told_ms / 1000), "the stream of a node beating at its interval ended"
        node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1"))
        assert node.connected and node.state == common_pb2.NODE_STATE_READY
        assert await _suspect_events(stubs, "node-1") == []
        await agent.close()


async def test_a_node_that_stops_is_marked_silent_by_its_own_timeout(migrated_db_url: str, tmp_path: Path) -> None:
    """Told 250 ms (four heartbeats a second), it beats twice and stops: its stream ends, the node
    suspect, after three of its own intervals of silence (0.75 s), not the 0.1 s heartbeat timeout."""
    async with _controller(migrated_db_url, tmp_path, timeout_s=0.1, max_per_second=4.0) as (_, stubs):
        agent, told_ms = await _joined(stubs, "node-1")
        assert told_ms == 250
        silence_timeout_s = 3 * told_ms / 1000
        end = _StreamEnd(agent)
        agent.heartbeat(1, 500.0)
        await asyncio.sleep(told_ms / 1000)
        last_beat = _last_beat(agent, 2)
        assert await end.within(silence_timeout_s + ENDED_WITHIN_S), "a silent stream was not ended"
        assert end.silent_since(last_beat) >= silence_timeout_s
        await _silent_suspect(stubs, "node-1", silence_timeout_s)
        await agent.close()


async def test_connected_agents_are_told_the_grown_interval_and_judged_by_it(migrated_db_url: str, tmp_path: Path) -> None:
    """Five heartbeats a second: each node joining lengthens the cluster's interval by 200 ms.
    Connected agents are told it once it grew 1.5 times past the shortest one told (at the 2nd and
    3rd node, not the 4th). Agents that keep beating at their Register's interval (they ignore what
    they are told) stay connected; node-0, told 600 ms, stops and is judged silent by 1.8 s of
    silence, not by its Register's 0.6 s nor the 0.3 s heartbeat timeout."""
    async with _controller(migrated_db_url, tmp_path, timeout_s=0.3, max_per_second=5.0) as (_, stubs):
        agents, told = await _all_joined(stubs, [f"node-{i}" for i in range(4)])
        assert told == [200, 400, 600, 800]
        await eventually(lambda: asyncio.sleep(0, [a.told_intervals_ms for a in agents]),
                         lambda pushed: pushed == [[400, 600], [600], [], []], timeout=ENDED_WITHIN_S,
                         every=0.02, what="the grown intervals told")
        silence_timeout_s = 3 * 600 / 1000
        end = _StreamEnd(agents[0])
        last_beat = _last_beat(agents[0], 1_000)
        assert await end.within(silence_timeout_s + ENDED_WITHIN_S), "node-0's silent stream was not ended"
        assert end.silent_since(last_beat) >= silence_timeout_s
        await _silent_suspect(stubs, "node-0", silence_timeout_s)
        for agent in agents[1:]:
            node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=agent.info.node_id))
            assert node.connected and await _suspect_events(stubs, agent.info.node_id) == []
        for agent in agents:
            await agent.close()


async def test_an_agent_registered_after_the_fleet_shrank_is_told_the_interval_it_grows_back_to(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Five heartbeats a second. Three nodes join (the cluster's interval grows to 600 ms, told
    to all); two leave. node-1 registers again with one node connected: told 400 ms, shorter than
    any agent was told since the last growth. When node-2 comes back the interval is 600 ms again,
    1.5 times node-1's: node-1 is told it on its stream (else it would beat faster than the cap)."""
    async with _controller(migrated_db_url, tmp_path, timeout_s=0.3, max_per_second=5.0) as (_, stubs):
        agents, told = await _all_joined(stubs, ["node-0", "node-1", "node-2"])
        assert told == [200, 400, 600]
        for agent in agents[1:]:
            await agent.close()
            await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=agent.info.node_id)),
                             lambda node: not node.connected, timeout=ENDED_WITHIN_S, what="the stream ended")
        back, told = await _all_joined(stubs, ["node-1", "node-2"])
        assert told == [400, 600]
        await eventually(lambda: asyncio.sleep(0, [a.told_intervals_ms for a in back]),
                         lambda pushed: pushed == [[600], []], timeout=ENDED_WITHIN_S,
                         every=0.02, what="the grown interval told to the agent registered after the fleet shrank")
        for agent in [agents[0], *back]:
            await agent.close()
