"""cluster_usage: the database's sums per node and tenant equal the per-placement rule."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import pytest
from sqlalchemy import select, update

from controller.errors import FailedPrecondition, ResourceExhausted
from controller.identity import CONTROLLER, Principal, Role
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.domain.values import AcceleratorFault
from controller.usecases import updates

from .seed import TWO_RACKS, seed_problem

# Whole and fractional shards of two tenants on two racks; n3 is down (no idle power counted).
CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [
        {"id": "n1", "rack": "rack1", "accelerators": 4, "idle_power_w": 600.0},
        {"id": "n2", "rack": "rack1", "accelerators": 4, "idle_power_w": 600.0},
        {"id": "n3", "rack": "rack2", "accelerators": 4, "idle_power_w": 500.0, "state": "down"},
    ],
    "tenants": [{"id": "a"}, {"id": "b"}],
    "deployments": [
        {"id": "big", "tenant": "a", "replicas": 1, "shards_per_replica": 2,
         "shard": {"accelerators": 2, "power_w": 700.0}},
        {"id": "frac", "tenant": "b", "replicas": 3, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "accelerator_milli": 250, "power_w": 800.0}},
    ],
    "placements": [
        {"deployment": "big", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0, 1]},
        {"deployment": "big", "replica": 0, "shard": 1, "node": "n3", "accelerator_indices": [0, 1]},
        {"deployment": "frac", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [2],
         "accelerator_milli": 250},
        {"deployment": "frac", "replica": 1, "shard": 0, "node": "n1", "accelerator_indices": [2],
         "accelerator_milli": 250},
        {"deployment": "frac", "replica": 2, "shard": 0, "node": "n2", "accelerator_indices": [0],
         "accelerator_milli": 250},
    ],
}


async def test_usage_sums_match_placement_milli(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        usage = await repo.cluster_usage(uow.session)
        node_milli: dict[str, int] = defaultdict(int)
        tenant_power: dict[str, float] = defaultdict(float)
        for placement, dep in await uow.session.execute(select(m.Placement, m.Deployment).join(m.Deployment)):
            milli = repo.placement_milli(dep, placement)
            node_milli[placement.node_id] += milli
            tenant_power[dep.tenant_id] += dep.shard_power_w * milli / 1000.0
    assert dict(usage.node_milli) == node_milli == {"n1": 2500, "n2": 250, "n3": 2000}
    assert dict(usage.tenant_milli) == {"a": 4000, "b": 750}
    assert dict(usage.tenant_power_w) == pytest.approx(tenant_power) and tenant_power == {"a": 2800.0, "b": 600.0}
    assert dict(usage.node_shards) == {"n1": 3, "n2": 1, "n3": 1}
    assert {n: sorted(t) for n, t in usage.node_tenants.items()} == {"n1": ["a", "b"], "n2": ["b"], "n3": ["a"]}
    # Idle power of the nodes that are up, plus what the shards draw (on down n3 too: it is still placed).
    assert dict(usage.rack_power_w) == pytest.approx({"rack1": 1200.0 + 1400.0 + 600.0, "rack2": 1400.0})
    assert dict(usage.row_power_w) == pytest.approx({"row1": 1200.0 + 2800.0 + 600.0})
    assert usage.tenant("b").accelerators == 0.75


async def test_an_older_revisions_shards_count_what_they_hold_not_the_current_spec(database: Database) -> None:
    """During a rollout (big: 2 accelerators a shard to 4, frac: a quarter to a whole one) the
    old replicas' shards were counted at the new spec's size: a tenant's usage, its caps and
    reservation checks, and the racks' power read 4 accelerators for shards that hold 2 (found
    by exploratory testing). An older revision's shard counts its own indices and milli."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "big")
                                  .values(template_revision=2, shard_accelerators=4))
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "frac")
                                  .values(template_revision=2, shard_accelerator_milli=1000))
        await uow.commit()
    async with database.unit_of_work() as uow:
        usage = await repo.cluster_usage(uow.session)
        by_tenant = await repo.tenant_usage(uow.session, ["a", "b"])
        held = {placement.id: repo.placement_milli(dep, placement) for placement, dep in
                await uow.session.execute(select(m.Placement, m.Deployment).join(m.Deployment))}
    assert sorted(held.values()) == [250, 250, 250, 2000, 2000]
    assert dict(usage.node_milli) == {"n1": 2500, "n2": 250, "n3": 2000}
    assert dict(usage.tenant_milli) == {"a": 4000, "b": 750}
    assert (by_tenant["a"].accelerators, by_tenant["b"].accelerators) == (4.0, 0.75)
    assert by_tenant["a"].power_w == pytest.approx(2800.0)



async def test_an_older_revisions_shards_draw_their_own_revisions_power(database: Database) -> None:
    """A rollout from 700 W to 1,000 W an accelerator (big) and from 800 W to 100 W (frac): the
    old replicas' shards were counted at the new spec's power, a tenant's power and the racks'
    off by the difference while the rollout ran. An older revision's shard draws its revision's
    power (its spec in `revision_specs`); one whose spec is not kept, the current one's."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "big").values(
            template_revision=2, shard_power_w=1000.0,
            revision_specs={"1": {"shard": {"accelerators": 2, "power_w": 700.0}}}))
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "frac").values(
            template_revision=2, shard_power_w=100.0, revision_specs={}))  # revision 1's spec not kept
        await uow.commit()
    async with database.unit_of_work() as uow:
        usage = await repo.cluster_usage(uow.session)
        by_tenant = await repo.tenant_usage(uow.session, ["a", "b"])
        racks, _ = await repo.rack_power(uow.session)
    assert dict(usage.tenant_power_w) == pytest.approx({"a": 2800.0, "b": 75.0})  # 4 x 700; 3 x 0.25 x 100
    assert (by_tenant["a"].power_w, by_tenant["b"].power_w) == pytest.approx((2800.0, 75.0))
    assert dict(usage.rack_power_w) == pytest.approx({"rack1": 1200.0 + 1400.0 + 75.0, "rack2": 1400.0})
    assert racks == pytest.approx(usage.rack_power_w)


async def test_an_updates_power_cap_counts_the_deployments_older_shards_at_their_own_power(
        database: Database) -> None:
    """The cap check takes what the deployment holds out of the tenant's total: both at each
    shard's own revision's power (the total counted them so, the part taken out at the current
    spec's: "holds -1200 W elsewhere")."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "big").values(
            template_revision=2, shard_power_w=1000.0,
            revision_specs={"1": {"shard": {"accelerators": 2, "power_w": 700.0}}}))
        await uow.session.execute(update(m.Tenant).where(m.Tenant.id == "a").values(max_power_w=100.0))
        await uow.commit()
    assert await _contract(database, "a", "big", replicas=2) == (
        "ResourceExhausted: deployment big: 2 replicas need 8000 W; tenant a holds 0 W elsewhere, "
        "8000 W > max_power_w 100 W")


async def test_node_usage_is_the_cluster_usage_of_those_nodes_alone(database: Database) -> None:
    """`node_usage` (a node's view: `get node`, a cordon, a page of `get nodes`) reads the nodes
    asked for, and gives for them what `cluster_usage` gives; nothing of the other nodes."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        for asked in (["n1"], ["n2", "n3"], ["n1", "n2", "n3", "ghost"], []):
            usage = await repo.node_usage(uow.session, asked)
            assert dict(usage.node_milli) == {n: whole.node_milli[n] for n in asked if n in whole.node_milli}
            assert dict(usage.node_shards) == {n: whole.node_shards[n] for n in asked if n in whole.node_shards}
            assert dict(usage.node_tenants) == {n: whole.node_tenants[n] for n in asked if n in whole.node_tenants}
            assert dict(usage.node_tenant_milli) == {k: v for k, v in whole.node_tenant_milli.items() if k[0] in asked}
        n1 = await repo.node_usage(uow.session, ["n1"])
    assert dict(n1.node_tenant_milli) == {("n1", "a"): 2000, ("n1", "b"): 500} and dict(n1.node_shards) == {"n1": 3}


async def test_tenant_usage_is_the_cluster_usage_of_those_tenants_alone(database: Database) -> None:
    """`tenant_usage` (a tenant's view) sums the tenants asked for by the database, a row a
    tenant: what `cluster_usage` gives for them, and nothing for the others."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        for asked in (["a"], ["b"], ["a", "b", "ghost"], []):
            usage = await repo.tenant_usage(uow.session, asked)
            assert sorted(usage) == [t for t in sorted(asked) if t in whole.tenant_milli]
            for tenant, used in usage.items():
                assert used.accelerators == whole.tenant(tenant).accelerators
                assert used.power_w == pytest.approx(whole.tenant(tenant).power_w)
        b = (await repo.tenant_usage(uow.session, ["b"]))["b"]
    assert b.accelerators == 0.75 and b.power_w == pytest.approx(600.0)


async def test_power_usage_and_placed_milli_are_cluster_usages_totals(database: Database) -> None:
    """The topology view and the cluster summary read the database's sums (`power_usage`,
    `placed_milli`): what `cluster_usage` gives for the racks, the rows and in all."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        power = await repo.power_usage(uow.session)
        milli = await repo.placed_milli(uow.session)
    assert dict(power.rack_power_w) == dict(whole.rack_power_w) and dict(power.row_power_w) == dict(whole.row_power_w)
    assert not power.node_milli and not power.tenant_milli
    assert milli == sum(whole.node_milli.values()) == 4750


async def test_the_power_of_some_racks_is_the_whole_cluster_s_for_them(database: Database) -> None:
    """A topology apply's check reads the power of the racks it judges alone (`racks`): what the
    whole cluster's read gives for each of them, nothing of the others; a row's is the sum of its
    racks asked for, so all of its power when they are all asked for."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        whole = await repo.power_usage(uow.session)
        used, draw = await repo.rack_power(uow.session)
        for asked in (["rack1"], ["rack2"], ["rack1", "rack2", "ghost"], []):
            power = await repo.power_usage(uow.session, asked)
            assert dict(power.rack_power_w) == {k: w for k, w in whole.rack_power_w.items() if k in asked}
            assert await repo.rack_power(uow.session, asked) == (
                {k: w for k, w in used.items() if k in asked}, {k: w for k, w in draw.items() if k in asked})
        rack2 = await repo.power_usage(uow.session, ["rack2"])
        both = await repo.power_usage(uow.session, ["rack2", "rack1"])
    assert dict(rack2.row_power_w) == {"row1": whole.rack_power_w["rack2"]} == {"row1": 1400.0}
    assert dict(both.row_power_w) == dict(whole.row_power_w) == {"row1": 1200.0 + 1400.0 + 600.0 + 1400.0}


# Tenants with and without reservations (a owes nothing: it holds its 6; d and f hold nothing, f
# has a deployment with no placement), on nodes of every state (n5 is made suspect), with whole,
# quarter and 0.333 shards, one of a deployment being deleted (its placements still hold).
RESERVED: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [
        {"id": "n1", "rack": "rack1", "accelerators": 4},
        {"id": "n2", "rack": "rack1", "accelerators": 8},
        {"id": "n3", "rack": "rack1", "accelerators": 4, "state": "cordoned"},
        {"id": "n4", "rack": "rack2", "accelerators": 4, "state": "down"},
        {"id": "n5", "rack": "rack2", "accelerators": 4},
        {"id": "n6", "rack": "rack2", "accelerators": 2},
    ],
    "tenants": [{"id": "a", "reserved_accelerators": 6.0}, {"id": "b", "reserved_accelerators": 2.5},
                {"id": "c"}, {"id": "d", "reserved_accelerators": 3.0}, {"id": "e", "reserved_accelerators": 0.0},
                {"id": "f", "reserved_accelerators": 2.0}],
    "deployments": [
        {"id": "big", "tenant": "a", "replicas": 3, "shards_per_replica": 1, "shard": {"accelerators": 2}},
        {"id": "quarter", "tenant": "b", "replicas": 3, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "accelerator_milli": 250, "power_w": 100.0}},
        {"id": "third", "tenant": "c", "replicas": 3, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "accelerator_milli": 333, "power_w": 300.0}},
        {"id": "one", "tenant": "c", "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "gone", "tenant": "b", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "waits", "tenant": "f", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 4}},
    ],
    "placements": [
        {"deployment": "big", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0, 1]},
        {"deployment": "big", "replica": 1, "shard": 0, "node": "n3", "accelerator_indices": [0, 1]},
        {"deployment": "big", "replica": 2, "shard": 0, "node": "n4", "accelerator_indices": [0, 1]},
        {"deployment": "quarter", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [2],
         "accelerator_milli": 250},
        {"deployment": "quarter", "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [0],
         "accelerator_milli": 250},
        {"deployment": "quarter", "replica": 2, "shard": 0, "node": "n5", "accelerator_indices": [0],
         "accelerator_milli": 250},
        {"deployment": "third", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [1],
         "accelerator_milli": 333},
        {"deployment": "third", "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [1],
         "accelerator_milli": 333},
        {"deployment": "third", "replica": 2, "shard": 0, "node": "n1", "accelerator_indices": [3],
         "accelerator_milli": 333},
        {"deployment": "one", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [2]},
        {"deployment": "one", "replica": 1, "shard": 0, "node": "n5", "accelerator_indices": [1]},
        {"deployment": "gone", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [3]},
    ],
}


async def _seed_reserved(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, RESERVED)
        await uow.commit()
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.Node).where(m.Node.id == "n5").values(health=m.NodeHealth.SUSPECT))
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "gone")
                                  .values(phase=m.DeploymentPhase.DELETING))
        await uow.commit()


async def test_reserved_usage_is_the_cluster_usage_of_the_reserving_tenants(database: Database) -> None:
    """`reserved_usage` (an update's reservation check) gives each tenant with a reservation above 0
    its reservation and what `cluster_usage` says it holds (0 when nothing is placed); no others."""
    await _seed_reserved(database)
    async with database.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        expected = {t.id: (t.reserved_accelerators, whole.tenant(t.id).accelerators)
                    for t in await repo.list_tenant_rows(uow.session) if (t.reserved_accelerators or 0) > 0}
        reserved = await repo.reserved_usage(uow.session)
    assert reserved == expected
    assert list(reserved) == ["a", "b", "d", "f"]  # by id
    # b: three quarters and a whole shard of a deployment being deleted, still placed.
    assert reserved == {"a": (6.0, 6.0), "b": (2.5, 1.75), "d": (3.0, 0.0), "f": (2.0, 0.0)}


async def test_free_on_ready_nodes_is_the_ready_nodes_less_their_cluster_usage(database: Database) -> None:
    """`free_on_ready_nodes` is the ready nodes' accelerators (not cordoned, suspect or down) less
    what `cluster_usage` places on them, to the float nearest the exact figure."""
    await _seed_reserved(database)
    async with database.unit_of_work() as uow:
        whole = await repo.cluster_usage(uow.session)
        ready = [n for n in await repo.list_node_rows(uow.session) if n.state == "ready"]
        free = await repo.free_on_ready_nodes(uow.session)
        accelerators = {n.id: n.accelerators for n in ready}
    assert sorted(accelerators) == ["n1", "n2", "n6"]
    per_node = sum(a - whole.node_milli.get(n, 0) / 1000.0 for n, a in accelerators.items())
    exact = (1000 * sum(accelerators.values()) - sum(whole.node_milli.get(n, 0) for n in accelerators)) / 1000.0
    # n1: 2 + 0.25 + 0.333 held of 4; n2: 0.25 + 2 * 0.333 + 1 + 1 (deleting) of 8; n6: none of 2.
    assert free == exact == pytest.approx(per_node, abs=1e-9)
    assert free == 8.501


async def test_free_on_ready_nodes_leaves_out_failed_accelerators(database: Database) -> None:
    """A failed accelerator of a ready node is not free (no shard is placed on it); one of a
    cordoned node was not counted anyway, and an index the node no longer has is no accelerator."""
    await _seed_reserved(database)
    faults = {"n6": [0], "n1": [3, 9], "n3": [2]}  # n1 has 4: its index 9 is gone; n3 is cordoned
    async with database.unit_of_work() as uow:
        for node_id, indices in faults.items():
            row = await repo.get_node(uow.session, node_id)
            assert row is not None
            repo.set_failed_accelerators(row, [AcceleratorFault(i, "uncorrectable memory error") for i in indices])
        await uow.commit()
    async with database.unit_of_work() as uow:
        free = await repo.free_on_ready_nodes(uow.session)
    assert free == 6.501  # 8.501 (the test above) less n6's 0 and n1's 3


async def test_node_state_counts_agree_with_each_nodes_state(database: Database) -> None:
    """The database's counts per operator state equal `Node.state` node by node, and the
    accelerators counted are those of nodes not down (a cordoned or suspect node's included)."""
    cluster = {**CLUSTER, "nodes": [
        {"id": "n1", "rack": "rack1", "accelerators": 4},
        {"id": "n2", "rack": "rack1", "accelerators": 8, "state": "cordoned"},
        {"id": "n3", "rack": "rack2", "accelerators": 4, "state": "down"},
        {"id": "n4", "rack": "rack2", "accelerators": 2},
        {"id": "n5", "rack": "rack2", "accelerators": 16},
    ], "deployments": [], "placements": []}
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, cluster)
        await uow.commit()
    async with database.unit_of_work() as uow:
        n5 = await repo.get_node(uow.session, "n5")
        assert n5 is not None
        n5.health = m.NodeHealth.SUSPECT
        n3 = await repo.get_node(uow.session, "n3")
        assert n3 is not None
        n3.cordoned = True  # down and cordoned: down
        await uow.commit()
    async with database.unit_of_work() as uow:
        counts, accelerators = await repo.node_state_counts(uow.session)
        by_state: dict[str, int] = defaultdict(int)
        for node in await repo.list_node_rows(uow.session):
            by_state[node.state] += 1
    assert counts == by_state == {"ready": 2, "cordoned": 1, "down": 1, "suspect": 1}
    assert accelerators == 4 + 8 + 2 + 16


async def _refusal(database: Database, tenant: str, name: str, who: Principal = CONTROLLER,
                   **changes: Any) -> FailedPrecondition | ResourceExhausted | None:
    """How `updates.check_contract` refuses `who` changing deployment `name` so (None: it allows it)."""
    async with database.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, tenant, name)
        assert row is not None
        try:
            await updates.check_contract(uow, who, row, dataclasses.replace(repo.deployment_spec(row), **changes))
        except (FailedPrecondition, ResourceExhausted) as refused:
            return refused
    return None


async def _contract(database: Database, tenant: str, name: str, who: Principal = CONTROLLER, **changes: Any) -> str:
    """What `updates.check_contract` says of changing deployment `name` so: "" when it allows it."""
    refused = await _refusal(database, tenant, name, who, **changes)
    return "" if refused is None else f"{type(refused).__name__}: {refused}"


async def test_an_updates_contract_check_reads_these_sums(database: Database) -> None:
    """An update's caps and reservation check on the mixed cluster: the free accelerators of the
    ready nodes only (a deleting deployment's shard still held), less what accepted asks not
    placed yet take beyond their tenants' own reservations (f's 4 waiting: 2 of its own 2 owed
    and 2 more), what the other reserving tenants are still owed (not the updating tenant, not
    one holding its reservation), the tenant's own."""
    await _seed_reserved(database)
    owed = ("FailedPrecondition: deployment {} would take capacity reserved for other tenants: "
            "8.501 free on ready nodes{}, {} still owed ({})")
    waiting = " (2 of it asked already by work accepted, not placed yet)"
    assert await _contract(database, "c", "one", replicas=4) == owed.format(  # 2 more: 8.501 - 2 - 5.75 free
        "one: growing by 2 accelerators", waiting, "5.75", "b 0.75, d 3, f 2")
    assert await _contract(database, "c", "one", replicas=5, preemptible=True) == ""
    assert await _contract(database, "b", "quarter", replicas=20) == owed.format(
        "quarter: growing by 4.25 accelerators", waiting, "5", "d 3, f 2")
    async with database.unit_of_work() as uow:  # f's ask yields to reservations: it takes nothing from them
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "waits").values(preemptible=True))
        await uow.commit()
    assert await _contract(database, "c", "one", replicas=4) == ""  # 2 more: 8.501 - 5.75 free for it
    assert await _contract(database, "c", "one", replicas=5) == owed.format(
        "one: growing by 3 accelerators", "", "5.75", "b 0.75, d 3, f 2")
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.Tenant).where(m.Tenant.id == "c").values(max_accelerators=4.5))
        await uow.session.execute(update(m.Tenant).where(m.Tenant.id == "b").values(max_power_w=100.0))
        await uow.commit()
    assert await _contract(database, "c", "one", replicas=4) == (
        "ResourceExhausted: deployment one: 4 replicas need 4 accelerators; tenant c holds 0.999 accelerators "
        "elsewhere, 4.999 accelerators > max_accelerators 4.5 accelerators")
    assert await _contract(database, "b", "quarter", replicas=5) == (
        "ResourceExhausted: deployment quarter: 5 replicas need 125 W; tenant b holds 0 W elsewhere, "
        "125 W > max_power_w 100 W")
    assert await _contract(database, "b", "quarter", replicas=4) == ""


async def test_an_updates_reservation_check_counts_what_its_ask_grows_not_what_already_waits(
        database: Database) -> None:
    """f's `waits` (grown to 8 accelerators, none placed) asks more than the 4.751 free accelerators
    the other reserving tenants are not owed, and waited so before any update. A new priority or a
    scale-down asks no more than before: taken (they were refused, the whole unplaced ask counted
    as growth). A growth is refused with what the ask grows by and what would then wait to be placed."""
    await _seed_reserved(database)
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "waits").values(replicas=2))
        await uow.commit()
    assert await _contract(database, "f", "waits", priority=7) == ""
    assert await _contract(database, "f", "waits", replicas=1) == ""
    assert await _contract(database, "f", "waits", replicas=3) == (
        "FailedPrecondition: deployment waits: growing by 4 accelerators (12 not placed yet) would take capacity "
        "reserved for other tenants: 8.501 free on ready nodes, 3.75 still owed (b 0.75, d 3)")
    # What waits counts with the growth: 1 more for c's `one` (placed) fits the 2.751 not owed; with
    # 2 of the 3 already waiting it does not (nor with the 6 f's `waits` asks beyond its 2 owed).
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.Deployment).where(m.Deployment.name == "one").values(replicas=4))
        await uow.commit()
    assert await _contract(database, "c", "one", replicas=5) == (
        "FailedPrecondition: deployment one: growing by 1 accelerators (3 not placed yet) would take capacity "
        "reserved for other tenants: 8.501 free on ready nodes (6 of it asked already by work accepted, not "
        "placed yet), 5.75 still owed (b 0.75, d 3, f 2)")


async def test_an_updates_reservation_refusal_names_no_other_tenant_to_a_tenant_token(database: Database) -> None:
    """The refusal's message and RESERVATION reason name the owed tenants to an admin only; a tenant
    token reads only the total owed to other tenants (docs/security.md: a tenant never sees other
    tenants' names, nor how much each is owed)."""
    await _seed_reserved(database)
    admin = await _refusal(database, "c", "one", replicas=5)
    mine = await _refusal(database, "c", "one", Principal("lab-c", Role.TENANT, tenant="c"), replicas=5)
    assert admin is not None and mine is not None
    assert [(r.code, r.message, r.scope) for r in admin.reasons] == [
        ("RESERVATION", "5.75 accelerators owed to b 0.75, d 3, f 2", "")]
    assert str(mine) == ("deployment one: growing by 3 accelerators would take capacity reserved for other "
                         "tenants: 8.501 free on ready nodes (2 of it asked already by work accepted, not placed "
                         "yet), 5.75 still owed to them")
    assert [(r.code, r.message, r.scope) for r in mine.reasons] == [
        ("RESERVATION", "5.75 accelerators owed to other tenants", "")]


async def test_a_tenant_owed_more_than_it_asks_grows_though_others_are_owed_the_free_capacity(
        database: Database) -> None:
    """Reservations the cluster cannot hold all at once (f owed 20 on 8.501 free): each owed
    tenant's growth was refused for what the others are owed, the one owed the most included.
    Up to what it is owed itself, a tenant takes nothing owed to others; past it, it is refused."""
    await _seed_reserved(database)
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.Tenant).where(m.Tenant.id == "f").values(reserved_accelerators=20.0))
        await uow.commit()
    assert await _contract(database, "f", "waits", replicas=3) == ""  # 12 not placed, f owed 20
    assert await _contract(database, "f", "waits", replicas=6) == (
        "FailedPrecondition: deployment waits: growing by 20 accelerators (24 not placed yet) would take capacity "
        "reserved for other tenants: 8.501 free on ready nodes, 3.75 still owed (b 0.75, d 3)")
