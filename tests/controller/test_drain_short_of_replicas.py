"""A drain of a node holding a replica of a deployment short of its replicas (the cluster full).

Its replicas on the node go make-before-break as any drain's do, but the running count they keep
is the smaller of the replicas asked and the replicas placed when the drain began
(store/rollout.py, docs/rollout.md §Drain): once room frees and a replacement runs, the drained
replica goes, though the deployment is still short; until then it stays, and no drained replica
ever goes without a replacement of its own running (the deployment never runs fewer replicas than
before the drain because of it). Before, such a drain never completed: the drained replica went only
while the deployment kept its full count, which a full cluster never gives it.

`cluster` (tests/controller/conftest.py): four 4-accelerator nodes in two racks. A replica of a
whole node each: `fill` takes one node, `bg` asks 5 replicas and gets the 3 other nodes.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select

from bench.checking import check_state
from controller.store import models as m
from controller.store.db import Database
from controller.domain.liveness import Transition
from controller.domain.values import ShardReport
from controller.usecases import agents, deployments, liveness, nodes
from controller.usecases.ports import RecordingSignals
from test_reconcile_fast import assert_same, fresh, reconciler
from uc_builders import WHO, deployment, run_all, submit


async def _bg(db: Database) -> dict[int, tuple[str, str]]:
    """bg's replicas: stored replica -> (node, phase)."""
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(
            select(m.Placement.replica, m.Placement.node_id, m.Placement.phase)
            .join(m.Deployment).where(m.Deployment.name == "bg"))
        return {replica: (node, phase.value) for replica, node, phase in rows}


def _running(replicas: dict[int, tuple[str, str]]) -> int:
    return sum(phase == "running" for _, phase in replicas.values())


async def _report_running(db: Database, replicas: dict[int, tuple[str, str]]) -> None:
    """bg's `replicas` report running (as their agents would)."""
    async with db.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(node, ShardReport("bg", replica, 0, 10**9, "running", tenant="t1"))
                                             for replica, (node, _) in replicas.items()])


async def _full_cluster_with_bg_short(db: Database, *, loading: int = 0):
    """`fill` on one node, `bg` placed 3 of its 5 replicas on the others (the cluster is full),
    all running but the last `loading` of them."""
    loop = reconciler(db)
    await submit(db, deployment("fill", accelerators=4, locality="node"))
    await loop.reconcile_once()
    await run_all(db)
    await submit(db, deployment("bg", replicas=5, accelerators=4, locality="node"))
    await loop.reconcile_once()
    bg = await _bg(db)
    await _report_running(db, dict(sorted(bg.items())[:len(bg) - loading]))
    await loop.reconcile_once()
    bg = await _bg(db)
    assert len(bg) == 3 and _running(bg) == 3 - loading  # 3/5: no room for more
    return loop, bg


async def _drain(db: Database, node: str) -> None:
    async with db.unit_of_work() as uow:
        await nodes.drain_node(uow, WHO, node, RecordingSignals(), set(), {})


async def _free_fills_node(db: Database) -> None:
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "fill", RecordingSignals(), tenant="t1")


async def test_a_drain_of_a_deployment_short_of_replicas_completes_once_its_replacement_runs(cluster) -> None:
    loop, before = await _full_cluster_with_bg_short(cluster)
    drained = sorted(node for node, _ in before.values())[0]
    await _drain(cluster, drained)
    for _ in range(2):  # no room: the drained replica runs on (no replacement can be placed)
        await loop.reconcile_once()
        assert await _bg(cluster) == before
    await _free_fills_node(cluster)
    await loop.reconcile_once()  # the room goes to bg: a replacement beside the drained replica
    placed = await _bg(cluster)
    assert len(placed) == 4 and drained in {node for node, _ in placed.values()}
    assert _running(placed) == 3  # the replacement is still loading: nothing stopped yet
    await run_all(cluster)
    await loop.reconcile_once()  # it runs: the drained replica goes, though bg is still short (3/5)
    after = await _bg(cluster)
    assert len(after) == _running(after) == 3 and drained not in {node for node, _ in after.values()}
    snapshot = await fresh(cluster)
    assert_same(loop.warm_snapshot, snapshot)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def test_each_drained_replica_of_a_short_deployment_waits_for_a_replacement_of_its_own(cluster) -> None:
    # Two of bg's three nodes drained; room for one replica frees: one drained replica goes once
    # that replacement runs, the other stays (bg keeps the 3 replicas it ran before the drains).
    loop, before = await _full_cluster_with_bg_short(cluster)
    drained = sorted(node for node, _ in before.values())[:2]
    for node in drained:
        await _drain(cluster, node)
    await loop.reconcile_once()
    assert await _bg(cluster) == before
    await _free_fills_node(cluster)
    await loop.reconcile_once()
    await run_all(cluster)
    for _ in range(3):
        await loop.reconcile_once()
        after = await _bg(cluster)
        assert len(after) == _running(after) == 3
        assert len({node for node, _ in after.values()} & set(drained)) == 1


async def test_a_replica_still_loading_when_the_drain_began_is_no_replacement(cluster) -> None:
    # bg placed 3 replicas, 2 running and 1 loading, when a running one's node is drained: the
    # drain measures against the 3 placed, not the 2 running. The loading one coming up lets
    # nothing go (that would leave 2 running where 3 were coming); a replacement running does.
    loop, before = await _full_cluster_with_bg_short(cluster, loading=1)
    loading = max(before)
    drained = before[min(before)][0]
    await _drain(cluster, drained)
    await loop.reconcile_once()
    await _report_running(cluster, {loading: before[loading]})
    for _ in range(2):
        await loop.reconcile_once()
        now = await _bg(cluster)
        assert set(now) == set(before) and _running(now) == 3  # the drained replica runs on
    await _free_fills_node(cluster)
    await loop.reconcile_once()
    await run_all(cluster)
    await loop.reconcile_once()
    after = await _bg(cluster)
    assert len(after) == _running(after) == 3 and drained not in {node for node, _ in after.values()}


async def test_a_drained_replica_on_a_node_back_from_down_waits_for_its_agents_first_report(cluster) -> None:
    """A node down (its shards UNKNOWN) comes back: its Hello wakes a pass before its first
    heartbeat is flushed. The drained replica there, neither away (its node is up) nor running
    (UNKNOWN), was stopped as an outgoing replica that does not run: bg lost a replica with
    nothing placed for it (found in review). It waits for the agent's word, as on a down node."""
    loop, before = await _full_cluster_with_bg_short(cluster)
    replica, (drained, _) = min(before.items())
    await _drain(cluster, drained)
    await loop.reconcile_once()
    assert await _bg(cluster) == before
    async with cluster.unit_of_work() as uow:
        await liveness.apply_transitions(uow, [Transition(drained, "down", "silent")], datetime.now(timezone.utc))
    await loop.reconcile_once(force=True)
    assert (await _bg(cluster))[replica] == (drained, "unknown")  # away: left as it is
    async with cluster.unit_of_work() as uow:
        session = (await uow.session.get(m.Node, drained)).session_id
    async with cluster.unit_of_work() as uow:
        await agents.hello(uow, WHO, drained, session, datetime.now(timezone.utc))
    await loop.reconcile_once()  # the pass the Hello wakes, before the agent's first heartbeat
    assert (await _bg(cluster))[replica] == (drained, "unknown")
    await _report_running(cluster, {replica: (drained, "running")})
    await loop.reconcile_once()
    assert await _bg(cluster) == before  # still no room: the drained replica runs on
