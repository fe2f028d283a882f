"""Revision history (`usecases/revisions.py`): an update that rolls keeps the revision it makes and
the one it leaves, the newest `limits.REVISION_HISTORY` of a deployment are kept, and they go
with their deployment (on SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update

from controller import limits
from controller.store import models as m
from controller.store.db import Database
from controller.usecases import revisions, updates
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment, submit, with_shard

SVC = deployment("svc", "t1", replicas=2, shards=1, accelerators=1, shard_hbm_gib=16.0)


async def _roll(db: Database, hbm_gib: float) -> None:
    async with db.unit_of_work() as uow:
        row = await uow.session.scalar(select(m.Deployment).where(m.Deployment.name == "svc"))
        version = row.resource_version
    async with db.unit_of_work() as uow:
        done = await updates.update_deployment(uow, WHO, with_shard(SVC, hbm_gib=hbm_gib), version, RecordingSignals())
    assert done.rolling


async def _history(db: Database) -> list[tuple[int, float, bool]]:
    async with db.unit_of_work() as uow:
        views = await revisions.list_revisions(uow, WHO, "svc", tenant="t1")
    return [(v.revision, v.spec.shard.hbm_gib, v.current) for v in views]


async def test_the_newest_revisions_are_kept_and_go_with_their_deployment(cluster: Database) -> None:
    await submit(cluster, SVC)
    assert await _history(cluster) == [(1, 16.0, True)]
    for n in range(1, limits.REVISION_HISTORY + 3):  # revisions 2 .. REVISION_HISTORY + 3
        await _roll(cluster, 16.0 + n)
    history = await _history(cluster)
    newest = limits.REVISION_HISTORY + 3
    assert [r for r, _, _ in history] == list(range(newest, 3, -1))  # 13 .. 4: ten kept
    assert history[0] == (newest, 16.0 + newest - 1, True) and history[-1] == (4, 19.0, False)
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "svc"))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(m.DeploymentRevision)) == 0


async def test_a_revision_made_before_revisions_were_kept_is_kept_without_a_time(cluster: Database) -> None:
    await submit(cluster, SVC)
    async with cluster.unit_of_work() as uow:  # as an older controller left a rolled deployment: no rows
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "svc").values(template_revision=2))
        await uow.commit()
    await _roll(cluster, 24.0)
    async with cluster.unit_of_work() as uow:
        views = await revisions.list_revisions(uow, WHO, "svc", tenant="t1")
    assert [(v.revision, v.spec.shard.hbm_gib, v.created_at is None, v.changes) for v in views] == [
        (3, 24.0, False, ("shard.hbm_gib: 16 -> 24",)), (2, 16.0, True, ())]
