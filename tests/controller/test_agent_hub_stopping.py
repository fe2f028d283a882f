"""A Connect whose hello comes once the hub's `close_all` began (the controller is stopping) is
refused UNAVAILABLE with no session opened: nobody would close that session (it would be cut only
when the server's grace ends), and its agent should go to the next leader now. A stall of the
controller's own event loop ends no stream whose heartbeats wait to be read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from controller.agents import AgentHub, AgentInbound
from controller.agents import hub as hub_module
from controller.agents.session import AgentSession
from controller.domain.values import HeartbeatReport
from controller.errors import Unauthenticated, Unavailable
from controller.store import repositories as repo
from controller.store.db import Database
from uc_builders import WHO, quiet_agent, statements

NODE = "rack-a-n0"  # the `cluster` fixture's, up


def _hub(db: Database) -> AgentHub:
    return AgentHub(db, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                    on_deployments_changed=lambda views: asyncio.sleep(0))


async def _session_of(db: Database, node_id: str) -> str:
    async with db.unit_of_work() as uow:
        return (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].session_id


async def _silent() -> AsyncIterator[AgentInbound]:
    return
    yield


async def test_a_hello_after_close_all_is_refused_with_nothing_written(cluster):
    hub = _hub(cluster)
    session_id = await _session_of(cluster, NODE)
    hub.close_all()
    with statements(cluster) as seen, pytest.raises(Unavailable, match="controller is stopping"):
        await anext(hub.converse(WHO, NODE, session_id, _silent()))
    assert seen == []
    assert hub.connected() == frozenset()


async def test_a_hello_written_while_close_all_began_opens_no_session(cluster, monkeypatch):
    hub = _hub(cluster)
    session_id = await _session_of(cluster, NODE)
    write_hello = hub._hello

    async def stopped_meanwhile(hello):  # noqa: ANN001
        changed = await write_hello(hello)
        hub.close_all()  # the stop began while the hello was being written
        return changed

    monkeypatch.setattr(hub, "_hello", stopped_meanwhile)
    with pytest.raises(Unavailable, match="controller is stopping"):
        await anext(hub.converse(WHO, NODE, session_id, _silent()))
    assert hub.connected() == frozenset()



async def test_a_stall_of_the_event_loop_past_the_timeout_ends_no_stream_whose_heartbeat_waits_to_be_read(cluster):
    """The controller's own stall (a long collection, a starved process) is not the agents'
    silence: the check that runs before the readers took what arrived meanwhile ends nothing; the
    next one ends the stream that stayed silent. The stall is the hub's clock seen from its
    streams (each last heard from a timeout and more ago), not a real one: a real stall past a
    short timeout (0.3 s) left the beating stream that long to its second check, which a loaded
    machine can take too (then it ended as silent)."""
    hub = _hub(cluster)
    beats: asyncio.Queue[AgentInbound] = asyncio.Queue()

    async def beating() -> AsyncIterator[AgentInbound]:
        while True:
            yield await beats.get()

    quiet_node = "rack-a-n1"
    live = hub.converse(WHO, NODE, await _session_of(cluster, NODE), beating())
    quiet = hub.converse(WHO, quiet_node, await _session_of(cluster, quiet_node), quiet_agent())
    await anext(live)  # each stream's first set sent: its reader runs
    await anext(quiet)
    sessions = dict(hub._sessions)
    beats.put_nowait(HeartbeatReport(seq=1, power_draw_w=500.0))
    for session in sessions.values():  # the loop stalls past the timeout, the heartbeat unread
        session.last_seen -= session.timeout_s + 1.0
    await hub._expire()  # the check that runs first after the stall
    assert [s.closed for s in sessions.values()] == [False, False]
    for _ in range(5):  # the readers' turn
        await asyncio.sleep(0)
    await hub._expire()
    # The silent stream ended at the second check; the beating one lives.
    assert not sessions[NODE].closed
    assert sessions[quiet_node].closed and sessions[quiet_node].close_reason.startswith("no heartbeat for")
    for stream in (live, quiet):
        await stream.aclose()


async def test_the_silence_check_looks_at_a_slice_of_the_streams_a_step_letting_the_loop_in_between(
        cluster, monkeypatch):
    """One pass over 16,384 streams was one ~3 ms step of the event loop a second, which every call
    arriving then waited for. The check looks at `EXPIRE_SLICE` streams a step: a heartbeat read
    between two slices (its reader's turn) keeps its stream, which a check in one step ended, be
    its slice looked at before or after; a stream that ended meanwhile for another reason keeps
    that reason. A stream ended as silent has its late shards go with its node, not failed."""
    monkeypatch.setattr(hub_module, "EXPIRE_SLICE", 2)
    hub = AgentHub(cluster, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda views: asyncio.sleep(0), ack_timeout_s=1.0)
    sessions = [AgentSession(f"n{i}", f"s{i}", interval_ms=1000, timeout_s=3.0, last_seen=time.monotonic() - 10)
                for i in range(6)]
    hub._sessions.update((session.node_id, session) for session in sessions)
    await hub._expire()  # silent at one check: nothing ends
    assert not any(session.closed for session in sessions)
    sessions[1].unacknowledged[("t1", "web", 0, 0)] = (time.monotonic() - 30, 1, 0)  # late, and its stream silent
    loop = asyncio.get_running_loop()
    loop.call_soon(setattr, sessions[0], "last_seen", time.monotonic())  # heard after its slice was looked at
    loop.call_soon(setattr, sessions[5], "last_seen", time.monotonic())  # ... before
    loop.call_soon(sessions[4].close, "agent went away")
    await hub._expire()
    assert [session.close_reason.split(" for ")[0] for session in sessions] == ["", *["no heartbeat"] * 3,
                                                                               "agent went away", ""]
    assert not sessions[0].closed and not sessions[5].closed
    assert hub._buffer._reports == []  # n1's late shard was not written FAILED


async def test_a_stream_whose_credential_was_revoked_after_its_authentication_ends_as_it_opens(cluster):
    """A revocation heard between a Connect's authentication (a cached verification) and its
    session's opening found no stream of that credential to end, and the stream then served on
    with a revoked credential. The hub asks whether its token was revoked lately as it opens."""
    hub = AgentHub(cluster, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda views: asyncio.sleep(0), revoked=lambda token_id: token_id == "t-1")
    stream = hub.converse(replace(WHO, token_id="t-1"), NODE, await _session_of(cluster, NODE), quiet_agent())
    with pytest.raises(Unauthenticated, match=f"the credential of node {NODE} was revoked"):
        async with asyncio.timeout(10):
            async for _ in stream:
                pass
    assert hub.connected() == frozenset()
