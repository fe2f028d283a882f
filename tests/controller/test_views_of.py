"""The views a plan commit's publish reads (`usecases.deployments.views_of`): read as plain
columns, they must be what a read of the ORM rows gives, in the order of names, for the keys asked
only (a deployment named as another tenant's told apart by its tenant)."""

from __future__ import annotations

import dataclasses

from sqlalchemy import update

from controller.identity import Principal
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import updates
from controller.usecases.deployments import views_of
from controller.usecases.ports import RecordingSignals
from uc_builders import add_tenant, deployment, no_publish, submit


async def _orm_views(db: Database, keys: set[str]) -> list:
    async with db.unit_of_work() as uow:
        return [repo.deployment_view(row) for row in await repo.list_deployment_rows(uow.session, keys=keys)]


async def test_views_of_are_the_orm_rows_views_in_name_order(cluster: Database) -> None:
    await add_tenant(cluster, "t2")
    for name, tenant, replicas, shards in (("web", "t1", 2, 1), ("db", "t1", 1, 2), ("web", "t2", 1, 1),
                                           ("db", "t2", 1, 1), ("idle", "t1", 1, 1)):
        await submit(cluster, deployment(name, tenant, replicas=replicas, shards=shards))
    loop = Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000)
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:  # running (an outgoing replica that is not goes at once)
        await uow.session.execute(update(m.Placement).values(phase=m.ShardPhase.RUNNING))
        await uow.commit()
    async with cluster.unit_of_work() as uow:  # t1/web rolls: its old replicas outgoing beside the new
        view = repo.deployment_view(await repo.get_deployment(uow.session, "t1", "web"))
        spec = dataclasses.replace(view.spec, shard=dataclasses.replace(view.spec.shard, hbm_gib=1.0))
        await updates.update_deployment(uow, Principal("admin"), spec, view.resource_version, RecordingSignals())
    await loop.reconcile_once()
    for name in ("huge", "huger"):  # a rack each: one of them finds none free
        await submit(cluster, deployment(name, "t1", shards=8))
    await loop.reconcile_once()
    # t9/web does not exist; t1/idle and t2/db (named as t1/db) are not asked for
    keys = {"t1/web", "t1/db", "t2/web", "t1/huge", "t1/huger", "t9/web"}
    async with cluster.unit_of_work() as uow:
        read = await views_of(uow, keys)
    expected = await _orm_views(cluster, keys)
    assert read == expected
    assert [(v.spec.name, v.spec.tenant) for v in read] == [
        ("db", "t1"), ("huge", "t1"), ("huger", "t1"), ("web", "t1"), ("web", "t2")]
    by_key = {v.spec.key: v for v in read}
    assert by_key["t1/web"].outgoing_replicas > 0  # the rollout's old replicas are in the view
    unplaced = [v for v in read if v.spec.name.startswith("huge") and not v.placements]
    assert unplaced and all(v.reasons for v in unplaced)  # unplaceable: why, nothing placed
    assert len(by_key["t1/db"].placements) == 2
