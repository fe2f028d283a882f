"""What makes it safe that a deposed leader's fenced unit of work that wrote nothing is not checked
against the lease on PostgreSQL (`lease.commit_fenced`: no COMMIT, no check, no round trip).

Every fenced unit after which the controller acts as the leader writes, so its COMMIT carries the
check: a plan commit, even one that changes nothing (it takes the generation row's lock with an
UPDATE), after which the reconciler pushes sets, publishes and keeps its cache; an accepted hello,
even one that changes no node's health (it stores the node's contact time), after which the agent
hub opens the stream and pushes the node's set. A unit that only read answers what the database
holds, as any controller would: a hello batch refused whole answers its refusals. If a change made
one of those writes conditional, a deposed leader would act unchecked: these tests fail then.
PostgreSQL only: SQLite checks every fenced commit with a statement of its own (`lease.fence`).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from controller.errors import FailedPrecondition
from controller.leadership import LeaderElection, LeaseSettings
from controller.store import models as m
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.plans import commit_plan
from controller.store.snapshot import load_snapshot
from controller.usecases import agents
from scheduler import Plan
from tests.store.test_lease import HOUR, POSTGRES_ONLY
from uc_builders import WHO

pytestmark = POSTGRES_ONLY


async def _deposed(database: Database) -> LeaderElection:
    """A leader whose lease ran out and was taken by another controller, while it still believes
    it leads (a long pause: its lease thread has not stepped it down yet)."""
    old = LeaderElection(database, address="old:1", holder="old", settings=LeaseSettings(ttl_s=HOUR))
    await old.step()
    async with database.unit_of_work() as uow:
        await uow.session.execute(m.LeaderLease.__table__.update().values(expires_at=0.0))
        await uow.session.commit()
    new = LeaderElection(database, address="new:1", holder="new", settings=LeaseSettings())
    await new.step()
    assert new.should_run() and old.should_run()
    return old


async def test_a_deposed_leaders_plan_commit_that_changes_nothing_is_refused(cluster: Database) -> None:
    """The reconciler pushes, publishes and keeps its cache after a plan commit: one that changes
    nothing is still a write (the generation row's lock), so a deposed leader's is refused. A unit
    that only read is not refused: that is the check pg9 dropped, safe only because of the first."""
    async with cluster.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    old = await _deposed(cluster)
    async with cluster.fenced(old).unit_of_work() as uow:  # reads only: not checked
        await load_snapshot(uow.session)
        await uow.commit()
    assert old.should_run()
    with pytest.raises(LeaseLost):
        async with cluster.fenced(old).unit_of_work() as uow:
            result = await commit_plan(uow.session, snapshot, Plan(status="optimal", placements=()), actor="old")
            assert not (result.changed_nodes or result.changed_deployments or result.updated_deployments)
            assert result.generation == snapshot.generation  # it changes nothing
            await uow.commit()
    assert not old.should_run()  # the refusal deposes it


async def test_a_deposed_leaders_hello_is_refused_even_when_it_changes_no_health(cluster: Database) -> None:
    """The agent hub opens a stream and pushes the node's set after its hello commits: a hello of a
    node already up changes no health but stores its contact time, so a deposed leader's is refused.
    A batch whose every hello is refused writes nothing and is answered from the stored rows (the
    answer the new leader gives too)."""
    async with cluster.unit_of_work() as uow:
        node = (await uow.session.execute(select(m.Node.id, m.Node.session_id, m.Node.health, m.Node.last_heartbeat_at)
                                          .order_by(m.Node.id).limit(1))).one()
    assert node.health is m.NodeHealth.UP
    old = await _deposed(cluster)
    now = datetime.now(timezone.utc)
    async with cluster.fenced(old).unit_of_work() as uow:
        [refused] = await agents.hellos(uow, [agents.Hello(WHO, node.id, "not-its-session")], now)
    assert isinstance(refused, FailedPrecondition) and "register again" in refused.message
    with pytest.raises(LeaseLost):
        async with cluster.fenced(old).unit_of_work() as uow:
            await agents.hellos(uow, [agents.Hello(WHO, node.id, node.session_id)], now)
    async with cluster.unit_of_work() as uow:
        assert await uow.session.scalar(select(m.Node.last_heartbeat_at).where(m.Node.id == node.id)) \
            == node.last_heartbeat_at
