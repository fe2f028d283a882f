"""The heartbeat interval an agent states in its Hello, over real gRPC: a controller that never
saw the node's Register (restarted here; a new leader after failover alike) judges the stream by
three of the stated interval, not by its own heartbeat timeout; an absurd one by the longest its
pacing tells (and tells the agent so); an agent that states none (0), as before the field existed,
by the timeout, or by what this controller told it at Register.

No real-second waits: a stream's silence is made by moving its last message back, and the hub's
silence check (`_expire`: silent at two checks in a row) is run by hand.

The pacing is the hub's, not the database's: SQLite alone."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from controller.agents import AgentSession
from controller.api.server import ControllerApp
from grpc_harness import HandAgent, Stubs, admin_token_of, controller_with_rack, running_controller

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"])

NODE = "node-1"
TIMEOUT_S = 2.0  # the test controllers' heartbeat timeout (grpc_harness.TEST_CONFIG)
LONGEST_MS = 131_072  # 65,536 nodes at the default 500 heartbeats a second


async def _session_after_silence(app: ControllerApp, node_id: str, silent_s: float) -> AgentSession:
    """The node's stream after it said nothing for `silent_s` at two of the hub's checks in a row."""
    session = app.hub._sessions[node_id]
    session.last_seen = time.monotonic() - silent_s
    await app.hub._expire()
    await app.hub._expire()
    return session


@pytest.mark.parametrize(("stated_ms", "quiet_s", "cut_s", "told_ms"), [
    pytest.param(4_000, 10.0, 12.5, [], id="4 s stated: judged by 12 s, not the 2 s timeout"),
    pytest.param(2**31 - 1, 390.0, 394.0, [LONGEST_MS], id="absurd: 65,536 nodes' interval at most, told so"),
    pytest.param(0, 1.5, 2.5, [], id="none stated (older agents): the timeout"),
])
async def test_a_controller_that_never_saw_the_register_judges_the_stream_by_the_stated_interval(
        migrated_db_url: str, tmp_path: Path, stated_ms: int, quiet_s: float, cut_s: float, told_ms: list[int]) -> None:
    async with controller_with_rack(migrated_db_url, tmp_path) as (_, stubs):
        session_id = (await HandAgent(stubs, NODE, "rack-a").register()).session_id
    async with running_controller(migrated_db_url, tmp_path) as app:  # restarted: it never heard the Register
        stubs = Stubs.connect(app.address, admin_token_of(app))
        agent = HandAgent(stubs, NODE, "rack-a")
        try:
            await agent.connect(session_id, heartbeat_interval_ms=stated_ms)
            await agent.next_set()
            assert agent.told_intervals_ms == told_ms  # a HeartbeatPolicy comes before the first set
            assert not (await _session_after_silence(app, NODE, quiet_s)).closed
            cut = await _session_after_silence(app, NODE, cut_s)
            assert cut.closed and cut.close_reason.startswith("no heartbeat for"), cut.close_reason
        finally:
            await agent.close()
            await stubs.channel.close()


async def test_a_hello_stating_no_interval_is_judged_by_the_one_told_at_register(migrated_db_url: str, tmp_path: Path) -> None:
    """One heartbeat a second: a lone node is told 1 s at Register (3 s of silence), longer than
    the 2 s timeout's third; its Hello stating none keeps that."""
    async with controller_with_rack(migrated_db_url, tmp_path, max_heartbeats_per_second=1.0) as (app, stubs):
        agent = HandAgent(stubs, NODE, "rack-a")
        try:
            assert (await agent.register()).heartbeat_interval_ms == 1_000
            await agent.connect()
            await agent.next_set()
            assert not (await _session_after_silence(app, NODE, 2.5)).closed
            assert (await _session_after_silence(app, NODE, 3.5)).closed
        finally:
            await agent.close()


async def test_a_negative_stated_interval_is_refused(migrated_db_url: str, tmp_path: Path) -> None:
    async with controller_with_rack(migrated_db_url, tmp_path) as (app, stubs):
        agent = HandAgent(stubs, NODE, "rack-a")
        await agent.register()
        await agent.connect(heartbeat_interval_ms=-1)
        error = await agent.reader_error()
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "heartbeat_interval_ms" in (error.details() or "")
        assert NODE not in app.hub.connected()
        await agent.close()
