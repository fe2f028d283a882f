"""The last views a plan commit's DELETED events carry (`reconcile.helpers._deleting_views`): read as plain
columns, they must be what a read of the ORM rows gives, for the deployments being deleted only."""

from __future__ import annotations

from controller.reconcile import Reconciler
from controller.reconcile.helpers import _deleting_views
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from uc_builders import add_tenant, deployment, no_publish, submit


async def test_deleting_views_are_the_rows_views_of_the_deployments_being_deleted(cluster: Database) -> None:
    await add_tenant(cluster, "t2")  # a deployment named as one of t1's: told apart by tenant
    for name, tenant, replicas, shards in (("a", "t1", 2, 2), ("b", "t1", 1, 1), ("a", "t2", 1, 2), ("c", "t1", 1, 1)):
        await submit(cluster, deployment(name, tenant, replicas=replicas, shards=shards))
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish, solve_time_limit_ms=2000).reconcile_once()
    async with cluster.unit_of_work() as uow:  # t1/a and t2/a are being deleted, t1/b is not
        rows = await repo.list_deployment_rows(uow.session, keys={"t1/a", "t2/a", "t1/b"})
        await repo.set_deleting(uow.session, [row for row in rows if row.tenant_id + "/" + row.name != "t1/b"])
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        # t1/b is not being deleted; t1/c is, but not asked for; t9/a does not exist
        views = await _deleting_views(uow.session, frozenset({"t1/a", "t2/a", "t1/b", "t9/a"}))
        expected = {row.tenant_id + "/" + row.name: repo.deployment_view(row) for row in await repo.list_deployment_rows(
            uow.session, keys={"t1/a", "t2/a"}, phases=[m.DeploymentPhase.DELETING])}
        only_t1 = await _deleting_views(uow.session, frozenset({"t1/a"}))
    assert set(views) == {"t1/a", "t2/a"}
    assert views == expected
    assert only_t1 == {"t1/a": expected["t1/a"]}  # t2/a is being deleted too, but was not asked for
    assert sum(len(v.placements) for v in views.values()) == 2 * 2 + 1 * 2  # placed ones, with their shards
