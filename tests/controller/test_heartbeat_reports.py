"""A heartbeat repeats the node's full shard state: the hub writes only the shards whose state
changed since the stream's last heartbeat (and all of them again after a failed write)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sqlalchemy import event, select

from controller.agents import AgentHub
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.domain.values import HeartbeatReport, ShardReport
from uc_builders import WHO, deployment, no_publish, submit


class _Stream:
    """One node's Connect conversation on the hub, fed from a queue."""

    def __init__(self, hub: AgentHub, node_id: str, session_id: str) -> None:
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.sets = 0
        self.task = asyncio.create_task(self._run(hub, node_id, session_id))

    async def _messages(self) -> AsyncIterator:
        while True:
            yield await self.inbound.get()

    async def _run(self, hub: AgentHub, node_id: str, session_id: str) -> None:
        async for _ in hub.converse(WHO, node_id, session_id, self._messages()):
            self.sets += 1

    async def say(self, message: object) -> None:
        await self.inbound.put(message)
        while not self.inbound.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the hub took it


async def _placement_reads_of_flush(hub: AgentHub, db) -> int:  # noqa: ANN001
    """The flush's statements that read placements (what writing shard reports costs)."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        await hub.flush()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
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
        session_id = (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].session_id
    hub = AgentHub(cluster, heartbeat_timeout_s=30, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0))
    stream = _Stream(hub, node_id, session_id)
    try:
        while stream.sets < 1:  # the node's set was sent: its shards are given
            await asyncio.sleep(0.01)

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
    finally:
        hub.close_all()
        stream.task.cancel()
        await asyncio.gather(stream.task, return_exceptions=True)


async def test_after_a_failed_write_the_next_heartbeat_writes_every_shard_again(cluster, monkeypatch):
    await submit(cluster, deployment("svc", replicas=1, shards=1, accelerators=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:
        p = await uow.session.scalar(select(m.Placement))
        node_id, generation = p.node_id, p.generation
        session_id = (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].session_id
    hub = AgentHub(cluster, heartbeat_timeout_s=30, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0))
    stream = _Stream(hub, node_id, session_id)
    try:
        while stream.sets < 1:
            await asyncio.sleep(0.01)
        running = HeartbeatReport(1, 900.0, (ShardReport("svc", 0, 0, generation, "running", tenant="t1"),))

        from controller.usecases import agents as agent_cases
        real = agent_cases.flush_reports

        async def broken(*args, **kwargs):  # noqa: ANN002, ANN003
            raise RuntimeError("the database said no")

        monkeypatch.setattr(agent_cases, "flush_reports", broken)
        await stream.say(running)
        await hub.flush()  # lost
        monkeypatch.setattr(agent_cases, "flush_reports", real)
        assert await _phases(cluster) == {(0, 0): "assigned"}

        await stream.say(running)  # the same state again: written this time
        assert await _placement_reads_of_flush(hub, cluster) > 0
        assert await _phases(cluster) == {(0, 0): "running"}
    finally:
        hub.close_all()
        stream.task.cancel()
        await asyncio.gather(stream.task, return_exceptions=True)
