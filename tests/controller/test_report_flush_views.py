"""The agents' report flush on random reports (every shard phase, stale generations, shards
reported by a node that does not hold them, failures): each shard holds the last report that
applies to it, each deployment the phase the rule gives its stored shards and a SHARD_FAILED
reason while a shard failed, and the views the flush publishes are what a read finds afterwards."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import update

from controller.api import convert
from controller.domain import restarts
from controller.domain.values import ShardReport
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.marks import ROWCOUNT_UNREAD
from controller.store.sqlite_driver import counted_trips
from controller.usecases import agents, deployments
from uc_builders import deployment, no_publish, statements, submit

PHASES = [p.value for p in m.ShardPhase]


async def _placed(db: Database) -> dict[tuple[str, int, int], tuple[str, int, str, str]]:
    """(key, replica, shard) -> (node, generation, phase, message) of every placement."""
    async with db.unit_of_work() as uow:
        return {(key, p.replica, p.shard): (p.node_id, p.generation, p.phase.value, p.message)
                for p, key in await repo.placements_of_deployments(uow.session, ["t1/a", "t1/b", "t1/c"])}


def _judged(placed: tuple[str, int, str, str], said: str, message: str) -> tuple[str, int, str, str]:
    """A placement (node, generation, phase, message) as a report that applies to it leaves it: a
    STOPPED of a shard taken up is a failure; of one not taken up yet, or failed already, nothing."""
    node, generation, phase, _ = placed
    if said != "stopped":
        return node, generation, said, message
    if phase in ("assigned", "failed"):
        return placed
    stopped = agents.STOPPED_WHILE_ASSIGNED
    return node, generation, "failed", f"{stopped}: {message}" if message else stopped


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_reports_leave_each_shard_and_deployment_as_the_rules_say(cluster: Database, seed: int) -> None:
    for name, replicas, shards in (("a", 2, 2), ("b", 3, 1), ("c", 1, 2)):
        await submit(cluster, deployment(name, replicas=replicas, shards=shards))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    nodes = sorted({node for node, _, _, _ in (await _placed(cluster)).values()})
    pick = random.Random(seed)
    for _ in range(12):
        before = await _placed(cluster)
        reports, expected = [], dict(before)
        for place, (held_by, generation, _, _) in pick.sample(sorted(before.items()), 4):
            said, node = pick.choice(PHASES), held_by
            kind = pick.random()
            if kind < 0.15:  # another node's word: ignored
                node = pick.choice(nodes)
            elif kind < 0.3:  # an older generation's: ignored
                generation -= 1
            message = pick.choice(["", f"said {said}"])
            key, replica, shard = place
            reports.append((node, ShardReport(key.split("/")[1], replica, shard, generation, said, message,
                                              tenant="t1")))
            if node == held_by and generation >= before[place][1]:
                expected[place] = _judged(before[place], said, message)
        published: dict = {}
        async with cluster.unit_of_work() as uow:
            changed = await agents.flush_reports(uow, {}, reports, views=published)

        assert await _placed(cluster) == expected
        assert changed == {place[0] for place, now in expected.items() if now != before[place]}
        assert set(published) == changed
        async with cluster.unit_of_work() as uow:
            read = {f"t1/{v.spec.name}": v for v in await deployments.views_of(uow, {"t1/a", "t1/b", "t1/c"})}
            rows = await repo.list_deployment_rows(uow.session, keys=set(read))
            for key, view in published.items():  # as sent (SQLite reads times back without their zone)
                assert convert.deployment_msg(view) == convert.deployment_msg(read[key])
            for row in rows:
                assert row.phase is repo.implied_phase(row)
                reasons = [r for r in row.reasons if r["code"] == restarts.SHARD_FAILED]
                newly = [p for p in row.placements
                         if p.phase is m.ShardPhase.FAILED and before[(f"t1/{row.name}", p.replica, p.shard)][2] != "failed"]
                if newly:
                    assert len(reasons) == 1
                    assert f"replica {newly[-1].replica} shard {newly[-1].shard}" in reasons[0]["message"]
                elif row.phase is m.DeploymentPhase.RUNNING:
                    assert reasons == []


async def test_a_report_read_before_a_move_leaves_the_moved_shard_alone(cluster: Database) -> None:
    """The flush writes what it read by (deployment, replica, shard): a plan commit that moves the
    shard to another node between the flush's read and its write must keep the new node's phase,
    not take a report from the node that no longer holds it."""
    await submit(cluster, deployment("a", replicas=1, shards=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:
        [read] = await repo.deployments_named(uow.session, ["a"])
    [placement] = read.placements
    old_node = placement.node_id
    [(_, generation, _, _)] = (await _placed(cluster)).values()
    async with cluster.unit_of_work() as uow:  # a plan commit moves it meanwhile (assigned to the new node)
        other = next(n.id for n in await repo.list_node_rows(uow.session) if n.id != old_node)
        row = (await repo.placements_of_deployments(uow.session, ["t1/a"]))[0][0]
        row.node_id, row.phase = other, m.ShardPhase.ASSIGNED
        await uow.commit()
    async with cluster.unit_of_work() as uow:  # the flush's write, from what it read before the move
        await repo.write_reported_shards(uow.session, [repo.ShardState(
            "t1/a", placement.replica, placement.shard, old_node, generation, m.ShardPhase.RUNNING, "", row.id)],
            m.utcnow())
        await uow.commit()
    assert (await _placed(cluster))[("t1/a", 0, 0)][0::2] == (other, m.ShardPhase.ASSIGNED.value)


async def test_the_node_a_shard_left_does_not_hide_the_report_of_the_node_it_went_to(cluster: Database) -> None:
    """A shard moved from one node to another is reported by both in one flush: LOADING by the node
    it went to, STOPPED by the one it left (read last). Only the placement's node's word counts:
    the LOADING is written (the flush kept one report per shard, the last, and dropped both)."""
    await submit(cluster, deployment("a", replicas=1, shards=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    [((_, replica, shard), (old_node, generation, _, _))] = (await _placed(cluster)).items()
    async with cluster.unit_of_work() as uow:  # moved: assigned to the new node
        other = next(n.id for n in await repo.list_node_rows(uow.session) if n.id != old_node)
        row = (await repo.placements_of_deployments(uow.session, ["t1/a"]))[0][0]
        row.node_id, row.phase = other, m.ShardPhase.ASSIGNED
        await uow.commit()
    went, left = (ShardReport("a", replica, shard, generation, phase.value, "", tenant="t1")
                  for phase in (m.ShardPhase.LOADING, m.ShardPhase.STOPPED))
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(other, went), (old_node, left)])
        await uow.commit()
    assert (await _placed(cluster))[("t1/a", 0, 0)][0::2] == (other, m.ShardPhase.LOADING.value)


_READ = repo.deployments_named


async def _flushed_while(cluster: Database, monkeypatch: pytest.MonkeyPatch, work: Any) -> repo.NamedDeployment:
    """Deployment "a" (one shard) placed, then its shard's RUNNING report flushed alone (no
    heartbeat to write first) while `work()` (another transaction) starts right after the flush's
    read of the deployments and is given until the flush is done to commit (it lands before the
    flush's write if nothing holds it); "a" as it ends."""
    await submit(cluster, deployment("a", replicas=1, shards=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    [((_, replica, shard), (node, generation, _, _))] = (await _placed(cluster)).items()
    started: list[asyncio.Task[None]] = []

    async def read_then_work(session, names, **kw):  # type: ignore[no-untyped-def]
        found = await _READ(session, names, **kw)
        if not started:
            started.append(asyncio.create_task(work()))
            await asyncio.wait(started, timeout=1.0)
        return found

    monkeypatch.setattr(repo, "deployments_named", read_then_work)
    report = ShardReport("a", replica, shard, generation, m.ShardPhase.RUNNING.value, "", tenant="t1")
    async with cluster.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(node, report)])
    await asyncio.gather(*started)
    async with cluster.unit_of_work() as uow:
        [row] = await _READ(uow.session, ["a"])
    return row


async def test_a_deletion_committed_while_the_flush_reads_stays_deleting(cluster: Database,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush reads the deployments it changes, then writes their phase: a deletion committed
    between that read and the write must not be undone (the deployment brought back RUNNING, its
    deletion lost): wherever the store serializes the two, the deployment ends DELETING."""

    async def delete() -> None:
        async with cluster.unit_of_work() as uow:
            await repo.set_deleting(uow.session, [r.row for r in await _READ(uow.session, ["a"])])
            await uow.commit()

    assert (await _flushed_while(cluster, monkeypatch, delete)).row.phase is m.DeploymentPhase.DELETING


async def test_reasons_a_plan_commit_wrote_while_the_flush_reads_are_kept(cluster: Database,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush writes a deployment's phase and reasons from what it read, only while the phase
    is still the one read: a plan commit that changes the deployment's reasons and not its phase
    (a replica it could not place, say) committed between that read and the write must not be
    written over: wherever the store serializes the two, the plan's reasons stay, and the
    report's phase (PostgreSQL: the flush locks the rows it reads)."""
    why = [{"code": "NO_CAPACITY", "message": "1 replica(s) not placed: no node has 4 free accelerators"}]

    async def plan_commit() -> None:  # its write of the reasons alone
        async with cluster.unit_of_work() as uow:
            await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "a")
                                      .values(reasons=why, updated_at=m.utcnow()))
            await uow.commit()

    row = (await _flushed_while(cluster, monkeypatch, plan_commit)).row
    assert row.reasons == why and row.phase is m.DeploymentPhase.RUNNING


async def test_a_flush_holds_the_writer_for_two_trips_its_writes_riding_with_them_heartbeats_last(
        cluster: Database) -> None:
    """On SQLite the flush's writes are deferred: the shards' write goes with the read of their
    deployments (the writer's turn taken by it, the read inside the transaction it begins), the
    phases' and the heartbeats' with the commit, in the order written (the heartbeats last). Each
    trip under load is a turn of a busy event loop while the flush holds the only writer; five
    trips were two."""
    if not cluster.is_sqlite:
        pytest.skip("deferred writes and trips are SQLite's")
    await submit(cluster, deployment("a", replicas=1, shards=1))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    [(_, replica, shard), (node, generation, _, _)] = next(iter((await _placed(cluster)).items()))
    report = ShardReport("a", replica, shard, generation, m.ShardPhase.RUNNING.value, "", tenant="t1")
    beat = agents.NodeBeat(datetime.now(timezone.utc), 300.0)
    with counted_trips() as trips, statements(cluster) as seen:
        async with cluster.unit_of_work() as uow:
            await agents.flush_reports(uow, {node: beat}, [(node, report)])
    assert [(t.function, t.deferred) for t in trips] == [("_run", 0), ("_run_after", 1), ("_commit_after", 2)]
    writes = [" ".join(st.replace(ROWCOUNT_UNREAD, "").split()[:2]) for st in seen if not st.startswith("SELECT")]
    assert writes == ["UPDATE placements", "UPDATE deployments", "UPDATE nodes"]
    assert (await _placed(cluster))[("t1/a", replica, shard)][2] == m.ShardPhase.RUNNING.value
    async with cluster.unit_of_work() as uow:
        [row] = await repo.deployments_named(uow.session, ["a"])
        assert row.row.phase is m.DeploymentPhase.RUNNING
        assert (await uow.session.get(m.Node, node)).power_draw_w == 300.0
