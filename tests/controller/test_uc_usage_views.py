"""The node, tenant, topology and cluster-summary views read their usage from the database's
sums (`repo.node_usage`, `tenant_usage`, `power_usage`, `placed_milli`): through the use cases,
pages however cut, a tenant's own view, a deleting deployment, down and cordoned nodes, fractional
shards, a tenant without placements and an empty cluster, they are what `cluster_usage` gives."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from controller.domain.values import NodeView, Usage
from controller.identity import Principal, Role
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import nodes, tenants, topology
from controller.usecases.paging import PageRequest
from uc_builders import add_tenant, deployment, no_publish, submit

ADMIN = Principal("admin")


async def _placed_in_every_state(db: Database) -> None:
    """t1 whole shards (one deployment then marked deleting), t2 quarter shards, t3 nothing
    placed; then one node down and another cordoned, their shards kept."""
    await add_tenant(db, "t2")
    await add_tenant(db, "t3")
    await submit(db, deployment("big", "t1", shards=2, accelerators=2, shard_power_w=400.0))
    await submit(db, deployment("going", "t1", accelerators=1, shard_power_w=300.0))
    await submit(db, deployment("frac", "t2", replicas=3, accelerators=1, shard_accelerator_milli=250,
                                shard_power_w=800.0))
    assert (await Reconciler(db, push=lambda nodes: None, publish=no_publish).reconcile_once()).solved
    async with db.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "going")
                                  .values(phase=m.DeploymentPhase.DELETING))
        placed = sorted(set((await uow.session.scalars(select(m.Placement.node_id))).all()))
        assert len(placed) >= 2
        await uow.session.execute(update(m.Node).where(m.Node.id == placed[0]).values(health=m.NodeHealth.DOWN))
        await uow.session.execute(update(m.Node).where(m.Node.id == placed[1]).values(cordoned=True))
        await uow.commit()


async def _pages(list_page, size: int) -> list:  # type: ignore[no-untyped-def]
    got, page = [], PageRequest(size)
    while True:
        listed = await list_page(page)
        got.extend(listed.items)
        if not listed.next_token:
            return got
        page = PageRequest(size, listed.next_token)


def _used(view: NodeView) -> tuple[float, int, tuple[str, ...], str]:
    """What a node's view says of its usage (and its state)."""
    return view.accelerators_used, view.shards, view.tenants, view.state


@pytest.mark.parametrize("placed", [True, False], ids=["placed", "empty"])
async def test_the_views_usage_is_cluster_usages(cluster: Database, placed: bool) -> None:
    if placed:
        await _placed_in_every_state(cluster)
    else:
        await add_tenant(cluster, "t2")
    async with cluster.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        node_rows = await repo.list_node_rows(uow.session)
        racks = [(k.id, k.row_id) for k in await repo.list_racks(uow.session)]
        tenant_ids = [t.id for t in await repo.list_tenant_rows(uow.session)]
        expected_nodes = {n.id: _used(repo.node_view(n, whole, False)) for n in node_rows}
    assert (sum(whole.node_milli.values()) > 0) == placed

    for size in (1, 3, 100):
        async with cluster.unit_of_work() as uow:
            listed = await _pages(lambda page: nodes.list_nodes(uow, ADMIN, set(), {}, page=page), size)
        assert {v.info.node_id: _used(v) for v in listed} == expected_nodes, size
        async with cluster.unit_of_work() as uow:
            views = await _pages(lambda page: tenants.list_tenants(uow, ADMIN, page), size)
        assert {v.spec.id: v.usage for v in views} == {t: whole.tenant(t) for t in tenant_ids}, size
    for node_id, expected in expected_nodes.items():
        async with cluster.unit_of_work() as uow:
            assert _used(await nodes.get_node(uow, ADMIN, node_id, set(), {})) == expected
    for tenant_id in tenant_ids:
        async with cluster.unit_of_work() as uow:
            assert (await tenants.get_tenant(uow, ADMIN, tenant_id)).usage == whole.tenant(tenant_id)

    async with cluster.unit_of_work() as uow:
        summary = await nodes.cluster_summary(uow, ADMIN)
        own = await nodes.cluster_summary(uow, Principal("t2-user", Role.TENANT, tenant="t2"))
        view = await topology.get_topology(uow, ADMIN)
    assert summary.accelerators_used == sum(whole.node_milli.values()) / 1000.0
    assert summary.power_used_w == pytest.approx(sum(whole.rack_power_w.get(k, 0.0) for k, _ in racks))
    assert {t.spec.id: t.usage for t in summary.tenants} == {t: whole.tenant(t) for t in tenant_ids}
    assert [(t.spec.id, t.usage) for t in own.tenants] == [("t2", whole.tenant("t2"))]
    assert own.accelerators_used == summary.accelerators_used  # the cluster's shape, a tenant's too
    assert {r.spec.id: r.power_used_w for r in view.racks} == {k: whole.rack_power_w.get(k, 0.0) for k, _ in racks}
    assert {r.spec.id: r.power_used_w for r in view.rows} == {
        r: whole.row_power_w.get(r, 0.0) for r in {row for _, row in racks}}
    if placed:
        assert whole.tenant("t2").accelerators == 0.75 and whole.tenant("t3") == Usage()
        assert whole.tenant("t1").accelerators == 5.0  # the deleting deployment's shard still counts
