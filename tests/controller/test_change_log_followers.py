"""The change log names every placement a commit writes (store/changes.py, store/plans/): the two
readers that keep a warm copy of the cluster from it, the isolation watchdog's view
(store/isolation_view.py) and the reconciler's warm cache (scheduling/warm.py, as a controller that
did not make the change follows it), stay what a fresh read of the database gives after each change.

The watchdog runs on a clock that never moves: it makes no periodic full check, so a change the
log does not name (or a generation that did not move) leaves its view stale, and the comparison
sees it. What it compares is what its rules judge: the nodes, the placements and the deployments
those name (a submit moves no generation and logs nothing by design: a deployment without
placements is judged by nothing until a plan commit, which names it, places it).
"""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, update

from controller.domain.changes import ClusterChange
from controller.domain.liveness import Transition
from controller.scheduling.cache import ClusterCache
from controller.scheduling.warm import WarmCluster
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.changes import read_generation_and_schedulable
from controller.store.db import Database
from controller.store.isolation_view import HeldRows
from controller.store.plans import commit_plan
from controller.store.snapshot import Snapshot, load_snapshot
from controller.usecases import deployments, liveness, nodes
from controller.usecases.ports import RecordingSignals
from controller.watchdog import IsolationWatchdog
from scheduler import problem_from_dict, solve
from test_reconcile_fast import assert_same, fresh
from uc_builders import WHO, deployment, submit

SURGE = 1


class Followers:
    """The watchdog's view and a reconciler's warm cache, both fed from the change log only."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.watchdog = IsolationWatchdog(db, full_every_s=float("inf"), clock=lambda: 0.0)
        self.warm = WarmCluster(db, surge=SURGE, allow_preemption=True, time_limit_ms=10_000)
        self.followed = 0  # checks where the cache followed the log (not built again)

    async def start(self) -> None:
        await self.watchdog.check_once()
        await self._build()

    async def _build(self) -> None:
        snapshot = await fresh(self.db)
        self.warm.own_generation = snapshot.generation
        self.warm.cache = ClusterCache.build(snapshot, allow_preemption=True, time_limit_ms=10_000)

    async def check(self) -> None:
        """Both follow the log to now, then equal a fresh read."""
        await self.watchdog.check_if_changed()
        assert _judged(self.watchdog.held_rows()) == _judged(await _fresh_view(self.db))
        if self.warm.cache is None:
            await self._build()
            return
        async with self.db.unit_of_work() as uow:
            generation, schedulable = await read_generation_and_schedulable(uow.session)
            await self.warm.catch_up(uow.session, generation=generation)
            if self.warm.cache is not None:
                await self.warm.arrivals(uow.session, schedulable)
        if self.warm.cache is None:  # a change it cannot follow: dropped (the full path reads it all)
            await self._build()
            return
        assert_same(self.warm.cache.snapshot, await fresh(self.db))
        self.followed += 1


async def _fresh_view(db: Database) -> HeldRows:
    watchdog = IsolationWatchdog(db)
    await watchdog.check_once()
    return watchdog.held_rows()


def _judged(rows: HeldRows) -> tuple[dict, dict, dict]:
    """What the rules judge: every node and placement, and the deployments the placements name."""
    named = {p[1] for p in rows.placements.values()}
    return rows.nodes, rows.placements, {d: v for d, v in rows.deployments.items() if d in named}


async def commit_full(db: Database, snapshot: Snapshot | None = None) -> None:
    """Another controller's whole-cluster pass: solve `snapshot` (a fresh read when None; an older
    one commits stale) and commit the plan unscoped."""
    async with db.unit_of_work() as uow:
        snap = snapshot or await load_snapshot(uow.session, surge=SURGE)
        problem = {**snap.problem, "options": {"mode": "batch", "time_limit_ms": 2000}}
        await commit_plan(uow.session, snap, solve(problem_from_dict(problem)), actor="other")
        await uow.commit()


async def delete(db: Database, name: str) -> None:
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, name, RecordingSignals(), tenant="t1")


async def quarantine(db: Database, name: str) -> None:
    async with db.unit_of_work() as uow:
        await repo.quarantine_deployment(uow.session, f"t1/{name}", "the solver fails on it", datetime.now(timezone.utc))
        await uow.commit()


async def quarantine_keeping_shards(db: Database, name: str) -> None:
    """A deployment set QUARANTINED with its shards left stored (what a hand edit, or a writer of an
    older controller, leaves), logged as a quarantine is: the next plan commit removes its shards."""
    async with db.unit_of_work() as uow:
        await repo.will_move_generation(uow.session)
        await uow.session.execute(update(m.Deployment).where(m.Deployment.tenant_id == "t1", m.Deployment.name == name)
                                  .values(phase=m.DeploymentPhase.QUARANTINED))
        await repo.bump_cluster_generation(uow.session, ClusterChange.deployment(f"t1/{name}"))
        await uow.commit()


async def placed(db: Database, name: str) -> int:
    async with db.unit_of_work() as uow:
        return len((await uow.session.execute(select(m.Placement.id).join(m.Deployment).where(
            m.Deployment.tenant_id == "t1", m.Deployment.name == name))).all())


async def test_a_commit_removing_the_shards_of_a_deployment_deleted_after_its_snapshot_names_it(cluster):
    followers = Followers(cluster)
    await submit(cluster, deployment("web", replicas=2, accelerators=2))
    await commit_full(cluster)
    await followers.start()
    before = await fresh(cluster)
    await delete(cluster, "web")  # after the snapshot: the commit's plan still holds its shards
    await followers.check()
    await commit_full(cluster, before)  # `committed.leaving`: its shards go, its row stays
    assert await placed(cluster, "web") == 0
    await followers.check()


async def test_a_commit_removing_the_shards_of_a_quarantined_deployment_names_it(cluster):
    followers = Followers(cluster)
    await submit(cluster, deployment("web", replicas=2, accelerators=2))
    await commit_full(cluster)
    await followers.start()
    await quarantine_keeping_shards(cluster, "web")
    await followers.check()
    await commit_full(cluster)  # `committed.leaving`
    assert await placed(cluster, "web") == 0
    await followers.check()


@pytest.mark.parametrize("shards_left", [False, True])
async def test_submitting_a_quarantined_deployment_again_names_it(cluster, shards_left):
    followers = Followers(cluster)
    await submit(cluster, deployment("web", replicas=2, accelerators=2))
    await commit_full(cluster)
    await followers.start()
    await (quarantine_keeping_shards if shards_left else quarantine)(cluster, "web")
    await followers.check()
    await submit(cluster, deployment("web", replicas=1, accelerators=1))  # its row (and shards) released
    assert await placed(cluster, "web") == 0
    await followers.check()
    await commit_full(cluster)
    await followers.check()


class Operations:
    """Random operations on a small cluster, the same for a seed."""

    def __init__(self, db: Database, seed: int) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.snapshots: list[Snapshot] = []  # older reads a plan commit may be solved from (stale)
        self.next_name = 0
        self.nodes = ["rack-a-n0", "rack-a-n1", "rack-b-n0", "rack-b-n1"]

    async def names(self, *phases: m.DeploymentPhase) -> list[str]:
        async with self.db.unit_of_work() as uow:
            rows = await uow.session.execute(select(m.Deployment.name).where(m.Deployment.phase.in_(phases))
                                             .order_by(m.Deployment.name))
            return list(rows.scalars())

    async def step(self) -> str:
        rng = self.rng
        self.snapshots = self.snapshots[-3:] + [await fresh(self.db)]
        live = (m.DeploymentPhase.PENDING, m.DeploymentPhase.SCHEDULED, m.DeploymentPhase.RUNNING,
                m.DeploymentPhase.DEGRADED)
        op = rng.choice(("submit", "submit", "submit", "commit", "commit", "commit", "stale_commit", "stale_commit",
                         "delete", "quarantine", "quarantine_keeping_shards", "resubmit", "cordon", "uncordon",
                         "down", "up"))
        if op == "submit":
            self.next_name += 1
            await submit(self.db, deployment(f"d{self.next_name}", replicas=rng.randint(1, 2),
                                             accelerators=rng.choice((1, 2))))
        elif op == "commit":
            await commit_full(self.db)
        elif op == "stale_commit":
            await commit_full(self.db, rng.choice(self.snapshots))
        elif op in ("delete", "quarantine", "quarantine_keeping_shards"):
            names = await self.names(*live)
            if names:
                await {"delete": delete, "quarantine": quarantine,
                       "quarantine_keeping_shards": quarantine_keeping_shards}[op](self.db, rng.choice(names))
        elif op == "resubmit":
            names = await self.names(m.DeploymentPhase.QUARANTINED)
            if names:
                await submit(self.db, deployment(rng.choice(names), replicas=1, accelerators=1))
        elif op in ("cordon", "uncordon"):
            async with self.db.unit_of_work() as uow:
                await (nodes.cordon_node if op == "cordon" else nodes.uncordon_node)(
                    uow, WHO, rng.choice(self.nodes), RecordingSignals(), set(), {})
        else:
            async with self.db.unit_of_work() as uow:
                node = rng.choice(self.nodes)
                transition = Transition(node, "down", "silent", evict=True) if op == "down" else Transition(node, "up", "hello")
                await liveness.apply_transitions(uow, [transition], datetime.now(timezone.utc))
        return op


@pytest.mark.parametrize("seed", range(8))
async def test_random_operations_leave_both_followers_what_a_fresh_read_gives(cluster, seed):
    followers = Followers(cluster)
    for name in ("a", "b", "c"):
        await submit(cluster, deployment(name, replicas=2, accelerators=1))
    await commit_full(cluster)
    await followers.start()
    operations = Operations(cluster, seed)
    done = []
    for _ in range(30):
        done.append(await operations.step())
        await followers.check()
    assert followers.followed >= 5, done  # the cache followed the log most of the time, not built again
