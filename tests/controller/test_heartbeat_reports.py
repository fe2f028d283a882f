"""A heartbeat repeats the node's full shard state: the hub writes only the shards whose state
changed since the stream's last heartbeat (and all of them again after a failed write). A heartbeat
may instead omit its shards under the version of the state it last sent in full: the hub writes
none, and asks for the full state when it does not hold that version. The hub times a shard's
way to RUNNING recorded by stage (`HubObserver`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select, update

from controller import limits
from controller.agents import AgentHub, HubObserver, ShardStateRequest
from controller.errors import ResourceExhausted, Unauthenticated
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.marks import ROWCOUNT_UNREAD
from controller.usecases import agents as agent_cases
from controller.domain.values import HeartbeatReport, ShardReport
from uc_builders import WHO, deployment, no_publish, statements, submit


class _Stream:
    """One node's Connect conversation on the hub, fed from a queue."""

    def __init__(self, hub: AgentHub, node_id: str, session_id: str) -> None:
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.sets = 0
        self.state_requests = 0
        self.task = asyncio.create_task(self._run(hub, node_id, session_id))

    async def _messages(self) -> AsyncIterator:
        while (message := await self.inbound.get()) is not None:  # None: the agent ends its stream
            yield message

    async def _run(self, hub: AgentHub, node_id: str, session_id: str) -> None:
        async for item in hub.converse(WHO, node_id, session_id, self._messages()):
            if isinstance(item, ShardStateRequest):
                self.state_requests += 1
            else:
                self.sets += 1

    async def say(self, message: object) -> None:
        await self.inbound.put(message)
        while not self.inbound.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the hub took it


async def _open(hub: AgentHub, db, node_id: str) -> _Stream:  # noqa: ANN001
    """The node's stream, open on `hub` with its first set sent."""
    async with db.unit_of_work() as uow:
        session_id = (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].session_id
    stream = _Stream(hub, node_id, session_id)
    while stream.sets < 1:  # the node's set was sent: its shards are given
        await asyncio.sleep(0.01)
    return stream


@asynccontextmanager
async def _streaming(db, node_id: str, observer: HubObserver | None = None,  # noqa: ANN001
                     contact_write_every_s: float | None = None,
                     **hub_kw: Any) -> AsyncIterator[tuple[AgentHub, _Stream]]:
    """A hub (heartbeat timeout 60 s) with the node's stream open and its first set sent."""
    hub = AgentHub(db, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0), observer=observer,
                   contact_write_every_s=contact_write_every_s, **hub_kw)
    stream = await _open(hub, db, node_id)
    try:
        yield hub, stream
    finally:
        hub.close_all()
        stream.task.cancel()
        await asyncio.gather(stream.task, return_exceptions=True)


async def _placement_reads_of_flush(hub: AgentHub, db) -> int:  # noqa: ANN001
    """The flush's statements that read placements (what writing shard reports costs)."""
    with statements(db) as seen:
        await hub.flush()
    return sum("FROM placements" in s for s in seen)


async def _phases(db) -> dict[tuple[int, int], str]:  # noqa: ANN001
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Placement.replica, m.Placement.shard, m.Placement.phase))
        return {(r, s): p.value for r, s, p in rows}


async def test_a_heartbeat_writes_only_the_shards_whose_state_changed(cluster):
    await submit(cluster, deployment("svc", replicas=1, shards=2, accelerators=1, locality="node"))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:
        placements = [(p.node_id, p.replica, p.shard, p.generation)
                      for p in await uow.session.scalars(select(m.Placement).order_by(m.Placement.shard))]
        [node_id] = {p[0] for p in placements}
    async with _streaming(cluster, node_id) as (hub, stream):
        def beat(seq: int, *phases: str) -> HeartbeatReport:
            return HeartbeatReport(seq, 900.0, tuple(
                ShardReport("svc", replica, shard, generation, phase, tenant="t1")
                for (_, replica, shard, generation), phase in zip(placements, phases)))

        await stream.say(beat(1, "loading", "loading"))
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "loading", (0, 1): "loading"}

        await stream.say(beat(2, "loading", "loading"))  # nothing changed: only the heartbeat is written
        assert await _placement_reads_of_flush(hub, cluster) == 0

        await stream.say(beat(3, "running", "loading"))  # one shard changed: written
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running", (0, 1): "loading"}

        # A report sent on its own, then repeated by the next heartbeat: written once.
        _, replica, shard, generation = placements[1]
        await stream.say(ShardReport("svc", replica, shard, generation, "running", tenant="t1"))
        assert await _placement_reads_of_flush(hub, cluster) > 0
        await stream.say(beat(4, "running", "running"))
        assert await _placement_reads_of_flush(hub, cluster) == 0
        assert await _phases(cluster) == {(0, 0): "running", (0, 1): "running"}
        async with cluster.unit_of_work() as uow:
            assert (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].power_draw_w == 900.0


async def _said_and_lost(hub: AgentHub, stream: _Stream, message: object, monkeypatch) -> None:  # noqa: ANN001
    """The agent says `message`, and the flush that would write it fails (the database said no)."""
    async def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("the database said no")

    with monkeypatch.context() as patch:
        patch.setattr(agent_cases, "flush_reports", broken)
        await stream.say(message)
        await hub.flush()


async def test_after_a_failed_write_the_next_heartbeat_writes_every_shard_again(cluster, monkeypatch):
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        running = HeartbeatReport(1, 900.0, (ShardReport("svc", 0, 0, generation, "running", tenant="t1"),))
        await _said_and_lost(hub, stream, running, monkeypatch)
        assert await _phases(cluster) == {(0, 0): "assigned"}

        await stream.say(running)  # the same state again: written this time
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running"}


async def test_a_stream_restated_writes_its_shards_again_over_what_the_lifecycle_wrote(cluster):
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        running = HeartbeatReport(1, 900.0, (ShardReport("svc", 0, 0, generation, "running", tenant="t1"),))
        await stream.say(running)
        await hub.flush()
        # Marked down meanwhile (a Hello that came after the lifecycle's read): its shard UNKNOWN.
        async with cluster.unit_of_work() as uow:
            await uow.session.execute(update(m.Placement).values(phase=m.ShardPhase.UNKNOWN))
            await uow.commit()
        await stream.say(replace(running, seq=2))  # unchanged on this stream: not written
        await hub.flush()
        assert await _phases(cluster) == {(0, 0): "unknown"}
        hub.restate([node_id, "no-such-node"])
        await stream.say(replace(running, seq=3))
        await hub.flush()
        assert await _phases(cluster) == {(0, 0): "running"}


async def _last_heartbeat(db, node_id: str):  # noqa: ANN001, ANN202
    async with db.unit_of_work() as uow:
        row = (await repo.node_rows_by_id(uow.session, [node_id]))[node_id]
        return row.last_heartbeat_at, row.power_draw_w


async def test_a_heartbeat_that_changes_only_the_time_is_written_when_due_or_when_its_stream_ends(cluster):
    """A live stream is the node's liveness: its last-heartbeat time is written at most every
    `contact_write_every_s` (three timeouts: 180 s here), a changed power draw at once, and the
    last one when the stream ends."""
    node_id = "rack-a-n0"
    async with _streaming(cluster, node_id) as (hub, stream):
        await stream.say(HeartbeatReport(1, 500.0))
        await hub.flush()
        first, power = await _last_heartbeat(cluster, node_id)
        assert power == 500.0

        await stream.say(HeartbeatReport(2, 500.0))  # only the time changed: held
        await hub.flush()
        assert await _last_heartbeat(cluster, node_id) == (first, 500.0)

        await stream.say(HeartbeatReport(3, 700.0))  # the power draw changed: written
        await hub.flush()
        changed, power = await _last_heartbeat(cluster, node_id)
        assert power == 700.0 and changed > first

        await stream.say(HeartbeatReport(4, 700.0))  # held ...
        await hub.flush()
        assert (await _last_heartbeat(cluster, node_id))[0] == changed
        hub.disconnect(node_id, "test")  # ... until the stream ends: then written
        await asyncio.gather(stream.task, return_exceptions=True)
        await hub.flush()
        assert (await _last_heartbeat(cluster, node_id))[0] > changed


async def test_a_new_streams_first_heartbeat_is_written_whatever_the_last_one_written(cluster):
    """A node deleted and registered again starts from a row of its own (power draw 0 W): the
    first heartbeat of its new stream was held back as unchanged from the deleted node's last one
    written, and the node showed 0 W until the next write was due (~30 s). A new stream's first
    heartbeat is written."""
    node_id = "rack-a-n0"
    async with _streaming(cluster, node_id) as (hub, stream):
        await stream.say(HeartbeatReport(1, 600.0))
        await hub.flush()
        assert (await _last_heartbeat(cluster, node_id))[1] == 600.0
        hub.disconnect(node_id, "test")
        await asyncio.gather(stream.task, return_exceptions=True)
        await hub.flush()
        async with cluster.unit_of_work() as uow:  # registered again: a new row's power draw
            await uow.session.execute(m.Node.__table__.update().where(m.Node.id == node_id).values(power_draw_w=0.0))
            await uow.commit()
        again = await _open(hub, cluster, node_id)
        try:
            await again.say(HeartbeatReport(1, 600.0))
            await hub.flush()
            assert (await _last_heartbeat(cluster, node_id))[1] == 600.0
        finally:
            again.task.cancel()
            await asyncio.gather(again.task, return_exceptions=True)


async def _heartbeat_rows_written(hub: AgentHub, stream: _Stream, db, beats: int) -> int:  # noqa: ANN001
    """The node rows the flushes write while the stream sends `beats` heartbeats of unchanged power."""
    written = 0
    for seq in range(beats):
        await stream.say(HeartbeatReport(seq + 1, 500.0))
        with statements(db) as seen:
            await hub.flush()
        written += sum(st.replace(f"{ROWCOUNT_UNREAD} ", "").startswith("UPDATE nodes") for st in seen)
    return written


async def test_heartbeats_on_a_live_stream_write_no_row_each(cluster):
    """Only the first of many heartbeats is written (the node's time, by default every three
    timeouts); a hub told to write every heartbeat's time writes one row a flush."""
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        assert await _heartbeat_rows_written(hub, stream, cluster, 5) == 1
    async with _streaming(cluster, "rack-a-n0", contact_write_every_s=0) as (hub, stream):
        assert await _heartbeat_rows_written(hub, stream, cluster, 5) == 5


async def test_the_observer_counts_the_heartbeat_rows_the_flushes_wrote(cluster):
    """`maia_agent_heartbeat_rows_written`: one per node row a committed flush wrote."""
    for every_s, rows in ((None, 1), (0, 5)):
        counted = _Stages()
        async with _streaming(cluster, "rack-a-n0", counted, contact_write_every_s=every_s) as (hub, stream):
            assert await _heartbeat_rows_written(hub, stream, cluster, 5) == rows
        assert counted.beat_rows == rows


async def test_a_stream_cancelled_while_its_end_is_written_still_marks_its_node_suspect(cluster, monkeypatch):
    """gRPC cancels a stream's handler when the connection under it dies (a keepalive ping
    unanswered), often while the hub writes the node's suspect mark: the mark is written anyway."""
    writing, written = asyncio.Event(), asyncio.Event()
    mark_suspect = agent_cases.mark_suspect

    async def held_mark(uow, node_id: str, **kw) -> bool:  # noqa: ANN001
        writing.set()
        await written.wait()
        return await mark_suspect(uow, node_id, **kw)

    monkeypatch.setattr(agent_cases, "mark_suspect", held_mark)
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        await stream.inbound.put(None)  # the agent's side ended
        await writing.wait()
        stream.task.cancel()  # ... and gRPC ends the handler
        await asyncio.gather(stream.task, return_exceptions=True)
        written.set()
        for _ in range(500):
            async with cluster.unit_of_work() as uow:
                health = (await repo.get_node(uow.session, "rack-a-n0")).health
            if health is m.NodeHealth.SUSPECT:
                break
            await asyncio.sleep(0.01)
        assert health is m.NodeHealth.SUSPECT


async def test_a_stream_that_ends_leaves_its_node_released_with_when_it_was_last_heard_from(cluster):
    """What the node lifecycle judges a node whose stream ended here by: the last heartbeat the hub
    saw, not the stored time (written every few timeouts). Forgotten when the node's stream opens
    again, and when this controller stops leading (the next leader judges the node)."""
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        await stream.say(HeartbeatReport(1, 500.0))
        heard = hub.last_heard()["rack-a-n0"]
        assert hub.released() == {}
        hub.revoke("rack-a-n0", "test")  # ended without marking it suspect: the lifecycle's to judge
        await asyncio.gather(stream.task, return_exceptions=True)
        [(node_id, at)] = hub.released().items()
        assert node_id == "rack-a-n0" and abs((at - heard).total_seconds()) < 0.5
        assert at <= datetime.now(timezone.utc)
        again = await _open(hub, cluster, "rack-a-n0")  # its agent is back
        assert hub.released() == {}
        hub.disconnect("rack-a-n0", "test")
        await asyncio.gather(again.task, return_exceptions=True)
        assert set(hub.released()) == {"rack-a-n0"}
        hub.follow("test")
        assert hub.released() == {}


async def test_connected_is_a_live_view_and_last_heard_is_asked_node_by_node(cluster):
    """`connected` is a live view of the streams, not a copy; the servicers' `last_heard` looks one
    node up at a time and agrees with the hub's whole map; `streams_changed` moves when a stream
    opens or ends, never with a heartbeat (the node lifecycle reads no node while it stays)."""
    from controller.api.deps import ServiceDeps
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        view, opened = hub.connected(), hub.streams_changed()
        assert set(view) == {"rack-a-n0"} and opened == 1
        await stream.say(HeartbeatReport(1, 500.0))
        assert hub.streams_changed() == opened
        heard = ServiceDeps(cluster, None, None, hub, 0).last_heard()  # type: ignore[arg-type]
        assert dict(heard) == hub.last_heard() and heard["rack-a-n0"] == hub.last_heard()["rack-a-n0"]
        assert heard.get("rack-b-n0") is None
        hub.disconnect("rack-a-n0", "test")
        await asyncio.gather(stream.task, return_exceptions=True)
        assert "rack-a-n0" not in view and len(view) == 0 and hub.streams_changed() == opened + 1
        assert set(heard) == {"rack-a-n0"}  # released: heard from on a stream here
        again = await _open(hub, cluster, "rack-a-n0")
        assert "rack-a-n0" in view and hub.streams_changed() == opened + 2
        hub.disconnect("rack-a-n0", "test")
        await asyncio.gather(again.task, return_exceptions=True)


async def test_a_heartbeat_with_a_bad_shard_report_ends_the_stream_and_leaves_nothing_behind(cluster):
    from controller.errors import InvalidArgument
    await submit(cluster, deployment("svc", replicas=1, shards=2, accelerators=1, locality="node"))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:
        placements = list(await uow.session.scalars(select(m.Placement).order_by(m.Placement.shard)))
        node_id, generation = placements[0].node_id, placements[0].generation
    async with _streaming(cluster, node_id) as (hub, stream):
        before = await _last_heartbeat(cluster, node_id)  # the hello's
        bad = HeartbeatReport(1, 900.0, (
            ShardReport("svc", 0, 0, generation, "running", tenant="t1"),
            ShardReport("svc", 0, 1, generation, "failed", "x" * (limits.REPORT_MESSAGE_MAX + 1), tenant="t1")))
        await stream.say(bad)
        [outcome] = await asyncio.gather(stream.task, return_exceptions=True)
        assert isinstance(outcome, InvalidArgument)
        await hub.flush()
    assert await _phases(cluster) == {(0, 0): "assigned", (0, 1): "assigned"}
    assert await _last_heartbeat(cluster, node_id) == before


async def _placed_on_one_node(cluster) -> tuple[str, int]:  # noqa: ANN001
    await submit(cluster, deployment("svc", replicas=1, shards=1, accelerators=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:
        p = await uow.session.scalar(select(m.Placement))
        return p.node_id, p.generation


def _versioned(seq: int, version: int, *shards: ShardReport, power: float = 900.0) -> HeartbeatReport:
    return HeartbeatReport(seq, power, shards, shard_state_version=version)


def _omitted(seq: int, version: int, power: float = 900.0) -> HeartbeatReport:
    return HeartbeatReport(seq, power, shard_state_version=version, shards_omitted=True)


async def test_a_heartbeat_that_omits_its_shards_under_the_version_held_writes_none(cluster):
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        running = ShardReport("svc", 0, 0, generation, "running", tenant="t1")
        await stream.say(_versioned(1, 7, running))
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running"}

        await stream.say(_omitted(2, 7, power=950.0))  # unchanged: no shard read or written, the beat is
        assert await _placement_reads_of_flush(hub, cluster) == 0
        assert (await _last_heartbeat(cluster, node_id))[1] == 950.0
        assert stream.state_requests == 0


async def test_a_heartbeat_naming_a_version_the_stream_does_not_hold_asks_for_the_full_state(cluster):
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        await stream.say(_omitted(1, 3))  # never sent in full on this stream
        assert stream.state_requests == 1
        assert await _placement_reads_of_flush(hub, cluster) == 0
        await stream.say(_omitted(2, 3))  # asked already: not again
        assert stream.state_requests == 1

        await stream.say(_versioned(3, 3, ShardReport("svc", 0, 0, generation, "running", tenant="t1")))
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running"}
        await stream.say(_omitted(4, 4))  # a version it did not send in full
        assert stream.state_requests == 2


async def test_after_a_failed_write_a_heartbeat_omitting_its_shards_gets_the_full_state_asked_and_written(
        cluster, monkeypatch):
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        running = _versioned(1, 5, ShardReport("svc", 0, 0, generation, "running", tenant="t1"))
        await _said_and_lost(hub, stream, running, monkeypatch)
        assert await _phases(cluster) == {(0, 0): "assigned"}

        await stream.say(_omitted(2, 5))  # the version the agent sent, but its state was not written
        assert stream.state_requests == 1
        await stream.say(running)  # what the agent sends when asked: written this time
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running"}


async def test_when_every_shard_is_due_again_a_heartbeat_omitting_its_shards_asks_for_them(cluster, monkeypatch):
    from controller.agents import reports  # where `ReportBuffer.accept` reads it
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        running = _versioned(1, 5, ShardReport("svc", 0, 0, generation, "running", tenant="t1"))
        await stream.say(running)
        await hub.flush()
        monkeypatch.setattr(reports, "FULL_REPORTS_EVERY_S", 0.0)  # every heartbeat rewrites every shard
        await stream.say(_omitted(2, 5))
        assert stream.state_requests == 1
        await stream.say(running)  # unchanged, but due: written again
        assert await _placement_reads_of_flush(hub, cluster) > 0


async def test_a_full_state_naming_a_shard_the_node_was_not_given_is_asked_for_again(cluster):
    """Refused shards are judged again at the next heartbeat (the node may be given them by then),
    as when every heartbeat carried them."""
    node_id, generation = await _placed_on_one_node(cluster)
    async with _streaming(cluster, node_id) as (hub, stream):
        await stream.say(_versioned(1, 9, ShardReport("other", 0, 0, generation, "running", tenant="t1")))
        await stream.say(_omitted(2, 9))
        assert stream.state_requests == 1


class _Stages:
    """A HubObserver that counts what each stage observed."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.beat_rows = 0

    def shard_start_stage(self, stage: str, seconds: Iterable[float]) -> None:
        self.seen.setdefault(stage, []).extend(seconds)

    def heartbeats_written(self, rows: int) -> None:
        self.beat_rows += rows

    def counts(self) -> dict[str, int]:
        return {stage: len(values) for stage, values in sorted(self.seen.items())}


async def test_a_shards_way_to_running_is_timed_once_per_stage(cluster):
    node_id, generation = await _placed_on_one_node(cluster)
    stages = _Stages()
    async with _streaming(cluster, node_id, stages) as (hub, stream):
        assert stages.counts() == {"push": 1}  # the stream's first set
        await stream.say(ShardReport("svc", 0, 0, generation, "loading", tenant="t1"))
        assert stages.counts() == {"push": 1}  # not running yet
        await stream.say(ShardReport("svc", 0, 0, generation, "running", tenant="t1"))
        await stream.say(ShardReport("svc", 0, 0, generation, "running", tenant="t1"))  # said again: timed once
        assert stages.counts() == {"agent": 1, "push": 1}
        await hub.flush()
        assert stages.counts() == {"agent": 1, "flush_wait": 3, "flush_write": 3, "push": 1}
        assert await _phases(cluster) == {(0, 0): "running"}

        hub.notify([node_id])  # the set again (unchanged): pushed, and the running shard not timed again
        while stream.sets < 2:
            await asyncio.sleep(0.01)
        await stream.say(HeartbeatReport(1, 900.0, (ShardReport("svc", 0, 0, generation, "running", tenant="t1"),)))
        assert stages.counts() == {"agent": 1, "flush_wait": 3, "flush_write": 3, "push": 2}
        assert all(v >= 0 for values in stages.seen.values() for v in values)


async def test_a_flush_of_reports_that_change_nothing_loads_no_deployment(cluster):
    node_id, generation = await _placed_on_one_node(cluster)
    running = [(node_id, ShardReport("svc", 0, 0, generation, "running", tenant="t1"))]
    async with cluster.unit_of_work() as uow:
        assert await agent_cases.flush_reports(uow, {}, running) == {"t1/svc"}
    with statements(cluster) as seen:  # the same again (a heartbeat's full state): one read of columns
        async with cluster.unit_of_work() as uow:
            assert await agent_cases.flush_reports(uow, {}, running) == set()
    assert len(seen) == 1 and "FROM placements JOIN deployments" in seen[0], seen
    assert await _phases(cluster) == {(0, 0): "running"}


async def test_a_removal_heard_late_ends_only_a_stream_older_than_the_nodes_registration(cluster):
    """`disconnect(registered=...)`: a removal heard after the node registered again (its current
    session, `PeerMessages._removed_elsewhere`) keeps that registration's stream and ends a stream
    of any other (older) session."""
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        session = hub._sessions["rack-a-n0"]
        hub.disconnect("rack-a-n0", "test", registered=session.session_id)
        assert not session.closed and hub._sessions.get("rack-a-n0") is session
        hub.disconnect("rack-a-n0", "test", registered="a-newer-registration")
        await asyncio.gather(stream.task, return_exceptions=True)
        assert session.closed and "rack-a-n0" not in hub.connected()


class _Pushed:
    """An inbound that pushes its messages, as a relayed stream does (`controller.aio.PushedStream`):
    `take` hands one to the hub at once, whether or not the stream's handler has run since."""

    def __init__(self) -> None:
        self.take: Callable[[object], None] | None = None

    def __aiter__(self) -> AsyncIterator:
        raise AssertionError("a pushed stream is not read")

    def push_to(self, take: Callable[[object], None], ended: Callable[[BaseException | None], None]) -> Callable[[], None]:
        self.take = take
        return lambda: None


async def test_a_stream_whose_credential_ends_takes_nothing_more_and_drops_its_expiry_timer(cluster):
    """Its credential revoked (or expired), a stream takes nothing its agent sends from then on,
    though its handler has not run its end yet (a relayed stream's messages are pushed to the hub
    by the frame's reader meanwhile); it ends UNAUTHENTICATED, and the timer that would have ended
    it at its token's expiry is cancelled with it."""
    hub = AgentHub(cluster, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0))
    async with cluster.unit_of_work() as uow:
        session_id = (await repo.node_rows_by_id(uow.session, ["rack-a-n0"]))["rack-a-n0"].session_id
    inbound = _Pushed()
    who = replace(WHO, token_id="0123456789abcdef", expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    stream = hub.converse(who, "rack-a-n0", session_id, inbound)
    try:
        await stream.__anext__()  # the first set: the hub takes the agent's messages from now on
        session = hub._sessions["rack-a-n0"]
        assert inbound.take is not None and session.expiry is not None
        inbound.take(HeartbeatReport(1, 500.0))
        heard = hub.heard_from("rack-a-n0")
        assert heard is not None
        hub.revoke_credentials([who.token_id])
        inbound.take(HeartbeatReport(2, 700.0))  # after the revocation, before the stream's end ran
        assert hub.heard_from("rack-a-n0") == heard
        with pytest.raises(Unauthenticated, match="was revoked"):
            await stream.__anext__()
        assert session.expiry.cancelled()
    finally:
        await stream.aclose()
        hub.close_all()


async def test_a_full_node_reporting_each_shard_loading_then_running_at_once_is_no_flood(cluster):
    """An agent reports every phase change: on a node of SHARDS_PER_NODE_MAX shards placed at once,
    a LOADING report of each and, once loaded, a RUNNING one. The default burst covered the
    LOADING reports alone, and the RUNNING ones ended the stream RESOURCE_EXHAUSTED."""
    async with _streaming(cluster, "rack-a-n0") as (hub, stream):
        for phase in ("loading", "running"):
            for index in range(limits.SHARDS_PER_NODE_MAX):
                stream.inbound.put_nowait(ShardReport("svc", index, 0, 1, phase, tenant="t1"))
        stream.inbound.put_nowait(HeartbeatReport(1, 500.0))
        while not stream.inbound.empty() and not stream.task.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not stream.task.done(), stream.task.exception()


async def test_a_flooding_stream_is_told_to_pause_a_second_at_least(cluster):
    """At 100 reports a second one report refills in 10 ms: a flooding agent was told to come back
    in that (1 ms at the default rate, found by exploratory testing) and resent its flood at once."""
    async with _streaming(cluster, "rack-a-n0", reports_per_second=100, reports_burst=20) as (hub, stream):
        for seq in range(40):  # all at once: the 21st finds the bucket empty
            stream.inbound.put_nowait(HeartbeatReport(seq, 500.0))
        [outcome] = await asyncio.gather(stream.task, return_exceptions=True)
    assert isinstance(outcome, ResourceExhausted) and outcome.retry_after_ms == 1000
    assert outcome.message == "node rack-a-n0 sent more than 100 reports a second (burst 20); retry in 1s"
