"""The views a plan commit's publish reads (`usecases.deployments.views_of`): read as plain
columns, they must be what a read of the ORM rows gives, in the order of names, for the keys asked
only (a deployment named as another tenant's told apart by its tenant)."""

from __future__ import annotations

import dataclasses

from sqlalchemy import update

from controller.identity import Principal, Role
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import updates
from controller.usecases.deployments import list_deployments, views_of
from controller.usecases.paging import PageRequest
from controller.usecases.ports import RecordingSignals
from controller.usecases.redaction import redactor_of
from uc_builders import add_tenant, deployment, no_publish, submit


async def _orm_views(db: Database, keys: set[str]) -> list:
    async with db.unit_of_work() as uow:
        return [repo.deployment_view(row) for row in await repo.list_deployment_rows(uow.session, keys=keys)]


async def _placed_rolled_and_unplaced(cluster: Database) -> None:
    """Deployments of two tenants (two named alike), placed and running, one rolling (outgoing
    replicas beside the new), two gangs of which one finds no rack free (unplaced, with reasons)."""
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


async def test_views_of_are_the_orm_rows_views_in_name_order(cluster: Database) -> None:
    await _placed_rolled_and_unplaced(cluster)
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


async def test_listed_pages_are_the_orm_rows_views_in_name_then_id_order(cluster: Database) -> None:
    """`list_deployments` reads a page as plain columns (its keys, then `deployments_named`): the
    pages, however cut and filtered, hold what the ORM rows' views are, in the same order."""
    await _placed_rolled_and_unplaced(cluster)
    admin = Principal("admin")
    for tenant, name in (("", ""), ("t1", ""), ("t2", ""), ("", "web"), ("t1", "web")):
        async with cluster.unit_of_work() as uow:
            orm = [repo.deployment_view(row)
                   for row in await repo.list_deployment_rows(uow.session, tenant=tenant, name=name)]
        for size in (1, 2, 100):
            listed, page = [], PageRequest(size)
            while True:
                async with cluster.unit_of_work() as uow:
                    got = await list_deployments(uow, admin, tenant, page, name=name)
                assert len(got.items) <= size
                listed.extend(got.items)
                if not got.next_token:
                    break
                page = PageRequest(size, got.next_token)
            assert listed == orm, (tenant, name, size)
    assert [v.spec.key for v in orm] == ["t1/web"]  # the last filter: t1's web only


async def test_a_tenants_listed_pages_are_its_own_orm_views_as_it_may_read_them(cluster: Database) -> None:
    """A tenant token listing (no tenant asked, or its own) pages through its own deployments
    only, each the ORM row's view redacted for it, whatever the page size; t2's `web` and `db`
    named as t1's are never t1's."""
    await _placed_rolled_and_unplaced(cluster)
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.tenant_id == "t2")
                                  .values(reasons=[{"code": "ISOLATION", "message": "rack rack-a holds t1/web",
                                                    "scope": "t1"}]))
        await uow.commit()
    who = Principal("t2-user", Role.TENANT, tenant="t2")
    async with cluster.unit_of_work() as uow:
        redactor = await redactor_of(uow, who)
        orm = [redactor.deployment(repo.deployment_view(row))
               for row in await repo.list_deployment_rows(uow.session, tenant="t2")]
    assert [v.spec.key for v in orm] == ["t2/db", "t2/web"]
    assert all("t1" not in r.message and r.scope == "" for v in orm for r in v.reasons)
    for tenant in ("", "t2"):
        for size in (1, 2, 100):
            listed, page = [], PageRequest(size)
            while True:
                async with cluster.unit_of_work() as uow:
                    got = await list_deployments(uow, who, tenant, page)
                listed.extend(got.items)
                if not got.next_token:
                    break
                page = PageRequest(size, got.next_token)
            assert listed == orm, (tenant, size)
