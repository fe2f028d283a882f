"""Races around a node's stream (controller/agents/hub.py, reports.py): the lead lost while a
Hello is written, a heartbeat whose write failed, an old stream's suspect mark landing after the
agent is back, a deleted node's stream. Each was found by reading the hub for what an event loop
turn in between could do."""

from __future__ import annotations

import asyncio

from controller.agents import NODE_DELETED
from controller.domain.values import HeartbeatReport
from controller.store import models as m
from controller.store import repositories as repo
from controller.usecases import agents as agent_cases
from test_heartbeat_reports import _last_heartbeat, _open, _Stream, _streaming

NODE = "rack-a-n0"  # the `cluster` fixture's, up


async def test_a_heartbeat_whose_write_failed_is_written_with_the_next_one_that_says_the_same(
        cluster, monkeypatch) -> None:  # noqa: ANN001
    """The beat not written was counted as written: the agent's next ones with the same power
    draw were held back as unchanged for a contact write's cadence (three timeouts), the stored
    power draw and time left old all along."""
    async with _streaming(cluster, NODE) as (hub, stream):
        await stream.say(HeartbeatReport(1, 500.0))
        await hub.flush()
        assert (await _last_heartbeat(cluster, NODE))[1] == 500.0

        async def failing(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
            raise RuntimeError("the write failed")

        with monkeypatch.context() as patched:
            patched.setattr(agent_cases, "flush_reports", failing)
            await stream.say(HeartbeatReport(2, 900.0))
            await hub.flush()
        assert (await _last_heartbeat(cluster, NODE))[1] == 500.0
        await stream.say(HeartbeatReport(3, 900.0))  # the same power draw again
        await hub.flush()
        assert (await _last_heartbeat(cluster, NODE))[1] == 900.0


async def test_a_hello_written_as_the_lead_is_lost_opens_no_stream(cluster, monkeypatch) -> None:  # noqa: ANN001
    """The Hello committed under the lease; before its stream opened, the election deposed this
    controller and `follow` ended the streams it held. A stream opened then would be a follower's:
    its silence never checked, its reports never written, its node judged silent by the leader."""
    leading = [True]
    async with _streaming(cluster, "rack-b-n0", leading=lambda: leading[0]) as (hub, _):
        hello = hub._hello

        async def deposed_meanwhile(h):  # noqa: ANN001, ANN202
            changed = await hello(h)
            leading[0] = False
            hub.follow("lease lost")
            return changed

        monkeypatch.setattr(hub, "_hello", deposed_meanwhile)
        stream = await asyncio.wait_for(_opened_or_ended(hub, cluster), 10)
        assert NODE not in hub.connected()
        assert stream.task.done() and "no longer leads" in str(stream.task.exception())


async def _opened_or_ended(hub, cluster):  # noqa: ANN001, ANN202
    """The node's stream, once its task ended (refused) or its first set was sent."""
    async with cluster.unit_of_work() as uow:
        session_id = (await repo.node_rows_by_id(uow.session, [NODE]))[NODE].session_id
    stream = _Stream(hub, NODE, session_id)
    while stream.sets < 1 and not stream.task.done():
        await asyncio.sleep(0.01)
    return stream


async def test_an_old_streams_suspect_mark_is_not_written_once_the_agent_is_back(cluster, monkeypatch) -> None:  # noqa: ANN001
    """The stream's connection died and its suspect mark waited for the writer; meanwhile the
    agent reconnected with the same session and its Hello wrote the node up. The mark's UPDATE
    (up, same session) matched and left the node suspect under a live stream."""
    waiting, go = asyncio.Event(), asyncio.Event()
    mark = agent_cases.mark_suspect

    async def behind_the_writer(uow, node_id, **kwargs):  # noqa: ANN001, ANN003, ANN202
        waiting.set()
        await go.wait()
        return await mark(uow, node_id, **kwargs)

    monkeypatch.setattr(agent_cases, "mark_suspect", behind_the_writer)
    async with _streaming(cluster, NODE) as (hub, stream):
        await stream.inbound.put(None)  # the old stream ends
        await waiting.wait()
        again = await _open(hub, cluster, NODE)  # the agent is back, same session
        go.set()
        await asyncio.gather(stream.task, return_exceptions=True)
        async with cluster.unit_of_work() as uow:
            health = (await repo.get_node(uow.session, NODE)).health
        assert NODE in hub.connected() and health is m.NodeHealth.UP
        again.task.cancel()
        await asyncio.gather(again.task, return_exceptions=True)


async def test_a_deleted_nodes_stream_leaves_no_trace_among_the_streams_ended(cluster) -> None:  # noqa: ANN001
    """`released` (the nodes whose stream ended here, with when last heard) is what the node
    lifecycle judges and the node views read; a deleted node's entry stayed for the leader's life."""
    async with _streaming(cluster, NODE) as (hub, stream):
        hub.disconnect(NODE, NODE_DELETED)
        await asyncio.gather(stream.task, return_exceptions=True)
        assert NODE not in hub.released()
    async with _streaming(cluster, "rack-a-n1") as (hub, stream):
        await stream.inbound.put(None)  # an agent that went away is kept
        await asyncio.gather(stream.task, return_exceptions=True)
        assert "rack-a-n1" in hub.released()
