"""Assignment pushes after a commit: every changed node's agent gets exactly its new set, and the
sets of all the nodes a commit changed are read together (a bounded number of statements, not a
transaction per node)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controller.agents import AgentHub, Wakeup
from controller.errors import NotFound
from controller.reconcile import Reconciler
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store import models as m
from controller.domain.values import AssignmentSet
from uc_builders import WHO, add_nodes, add_tenant, apply_topology, deployment, no_publish, statements, submit

NODES = 12


async def _cluster(db: Database) -> list[str]:
    """Two racks of six 4-accelerator nodes, tenants t1 and t2."""
    await apply_topology(db, {"rack-a": "row-a", "rack-b": "row-a"})
    nodes = [*await add_nodes(db, "rack-a", NODES // 2), *await add_nodes(db, "rack-b", NODES // 2)]
    await add_tenant(db, "t1")
    await add_tenant(db, "t2")
    return nodes


async def _expected(db: Database) -> dict[str, set[tuple[str, str, int, int, tuple[int, ...]]]]:
    """What each node holds, read straight from the placement rows."""
    from sqlalchemy import select
    held: dict[str, set[tuple[str, str, int, int, tuple[int, ...]]]] = {}
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(
            select(m.Placement.node_id, m.Deployment.tenant_id, m.Deployment.name, m.Placement.replica,
                   m.Placement.shard, m.Placement.accelerator_indices).join(m.Deployment))
        for node_id, tenant, name, replica, shard, indices in rows:
            held.setdefault(node_id, set()).add((tenant, name, replica, shard, tuple(indices)))
    return held


def _contents(s: AssignmentSet) -> set[tuple[str, str, int, int, tuple[int, ...]]]:
    return {(a.tenant, a.deployment, a.replica, a.shard, a.accelerator_indices) for a in s.assignments}


async def test_assignment_sets_reads_every_node_in_two_statements(database):
    nodes = await _cluster(database)
    # Two tenants' deployments of the same name, and a gang: shards on most nodes.
    await submit(database, deployment("chat", "t1", replicas=6, accelerators=2))
    await submit(database, deployment("chat", "t2", replicas=4, accelerators=1))
    await submit(database, deployment("gang", "t1", replicas=1, shards=4, accelerators=4, locality="row"))
    await Reconciler(database, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    expected = await _expected(database)
    assert len(expected) >= NODES // 2

    async with database.unit_of_work() as uow:
        with statements(database) as seen:
            sets = await repo.assignment_sets(uow.session, [*nodes, "no-such-node"])
        generations = {node_id: row.assignment_generation
                       for node_id, row in (await repo.node_rows_by_id(uow.session, nodes)).items()}
    assert len(seen) == 2  # the nodes' generations; their placements with their deployments
    assert set(sets) == set(nodes)  # a node that does not exist has no set
    for node_id in nodes:
        assert sets[node_id].generation == generations[node_id]
        assert _contents(sets[node_id]) == expected.get(node_id, set())
        order = [(a.deployment, a.tenant, a.replica, a.shard) for a in sets[node_id].assignments]
        assert order == sorted(order)
    gang = [a for s in sets.values() for a in s.assignments if a.deployment == "gang"]
    assert len(gang) == 4 and {a.shards_per_replica for a in gang} == {4}
    assert all(a.spec.accelerators == 4 and a.accelerator_milli == 0 for a in gang)


class _Agent:
    """One node's Connect stream on the hub: collects the sets it is sent."""

    def __init__(self, hub: AgentHub, node_id: str, session_id: str) -> None:
        self.node_id = node_id
        self.received: list[AssignmentSet] = []
        self.silent = asyncio.Event()  # the stream stays open, saying nothing
        self.task = asyncio.create_task(self._run(hub, session_id))

    async def _inbound(self) -> AsyncIterator:
        await self.silent.wait()
        yield  # pragma: no cover (never reached)

    async def _run(self, hub: AgentHub, session_id: str) -> None:
        async for current in hub.converse(WHO, self.node_id, session_id, self._inbound()):
            self.received.append(current)


async def _until(predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


async def test_a_commit_pushes_each_changed_node_exactly_its_new_set_in_one_batched_read(database):
    nodes = await _cluster(database)
    async with database.unit_of_work() as uow:
        sessions = {node_id: row.session_id for node_id, row in (await repo.node_rows_by_id(uow.session, nodes)).items()}
    hub = AgentHub(database, heartbeat_timeout_s=30, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0))
    watched = nodes[:-2]  # two nodes have no stream: nothing is read for them
    agents = {n: _Agent(hub, n, sessions[n]) for n in watched}
    try:
        await _until(lambda: all(len(a.received) == 1 for a in agents.values()))
        assert all(a.received[0].assignments == () for a in agents.values())

        pushed: set[str] = set()
        await submit(database, deployment("chat", "t1", replicas=8, accelerators=2))
        await submit(database, deployment("chat", "t2", replicas=3, accelerators=1))
        await Reconciler(database, push=pushed.update, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
        changed = pushed & set(watched)
        assert len(changed) >= 4
        with statements(database) as seen:
            hub.notify(pushed)
            await _until(lambda: all(len(agents[n].received) == 2 for n in changed))
            await asyncio.sleep(0.1)  # nothing more arrives
        # The changed nodes' sets in one or two batched reads (2 statements each), never one per node.
        assert 2 <= len(seen) <= 4, seen

        expected = await _expected(database)
        async with database.unit_of_work() as uow:
            generations = {node_id: row.assignment_generation
                           for node_id, row in (await repo.node_rows_by_id(uow.session, nodes)).items()}
        for node_id, agent in agents.items():
            if node_id in changed:
                latest = agent.received[-1]
                assert len(agent.received) == 2 and latest.node_id == node_id
                assert latest.generation == generations[node_id] > agent.received[0].generation
                assert _contents(latest) == expected[node_id]
            else:
                assert len(agent.received) == 1  # unchanged: nothing pushed
    finally:
        hub.close_all()
        for a in agents.values():
            a.task.cancel()
        await asyncio.gather(*(a.task for a in agents.values()), return_exceptions=True)


async def test_a_streams_pusher_wakes_for_a_set_made_before_or_while_it_waits_and_not_after_a_clear() -> None:
    wakeup = Wakeup()
    wakeup.set()
    await asyncio.wait_for(wakeup.wait(), 1)  # set before: no wait
    wakeup.clear()
    waiting = asyncio.create_task(wakeup.wait())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()  # cleared: it waits
    wakeup.set()
    await asyncio.wait_for(waiting, 1)
    wakeup.set()  # a set with no one waiting, twice: harmless
    wakeup.set()
    assert wakeup.is_set


async def test_a_push_to_a_node_deleted_elsewhere_ends_its_stream(database):
    """A node deleted by another controller whose NODE_REMOVED this one never heard (dropped past
    `notify.HELD_MAX`): the resync that follows pushes every connected agent its set
    (`PeerMessages.resync`), and the deleted node has none, so its stream ends as a delete's
    would; the other streams stay."""
    from controller.usecases.nodes import delete_node
    from controller.usecases.ports import RecordingSignals

    nodes = await _cluster(database)
    async with database.unit_of_work() as uow:
        sessions = {node_id: row.session_id for node_id, row in (await repo.node_rows_by_id(uow.session, nodes)).items()}
    hub = AgentHub(database, heartbeat_timeout_s=30, on_liveness_change=lambda: None,
                   on_deployments_changed=lambda keys: asyncio.sleep(0))
    gone, kept = nodes[0], nodes[1]
    agents = {n: _Agent(hub, n, sessions[n]) for n in (gone, kept)}
    try:
        await _until(lambda: all(len(a.received) == 1 for a in agents.values()))
        async with database.unit_of_work() as uow:  # elsewhere: this hub is not told
            await delete_node(uow, WHO, gone, RecordingSignals())
        hub.notify(list(hub.connected()))
        with pytest.raises(NotFound, match=f"^node {gone} was deleted by an administrator"):
            await asyncio.wait_for(agents[gone].task, 10)  # the stream ended, its agent told why
        assert set(hub.connected()) == {kept}
        assert not agents[kept].task.done()
    finally:
        hub.close_all()
        for a in agents.values():
            a.task.cancel()
        await asyncio.gather(*(a.task for a in agents.values()), return_exceptions=True)
