"""Dry runs of the writes whose request is the object itself (`controller/api/dryrun.py`):
CreateTenant, UpdateTenant, ApplyTopology, UpdateDeployment. Each answers what the write then
answers, refuses what the write refuses, and writes nothing: no row changes, not a statement
that writes is sent, nothing is woken."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from controller.errors import FailedPrecondition, NotFound, ResourceExhausted
from controller.reconcile import Reconciler
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import tenants, topology, updates
from controller.domain.values import RackSpec, RowSpec, TenantSpec, TopologySpec, ZoneSpec
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, add_tenant, deployment, every_row, no_publish, statements, submit

WRITES = ("INSERT", "UPDATE", "DELETE")


async def _dry(db: Database, use_case: Any) -> Any:
    """`use_case(uow, signals, dry_run=True)`'s answer, proving it wrote and woke nothing."""
    before = await every_row(db)
    signals = RecordingSignals()
    with statements(db) as seen:
        async with db.unit_of_work() as uow:
            answer = await use_case(uow, signals, dry_run=True)
    assert [s for s in seen if s.lstrip().upper().startswith(WRITES)] == []
    assert await every_row(db) == before
    assert signals.wakes == 0
    return answer


async def _real(db: Database, use_case: Any) -> Any:
    async with db.unit_of_work() as uow:
        return await use_case(uow, RecordingSignals())


async def _placed(cluster: Database) -> None:
    """t1's 2x3 accelerators and t2's one, placed (t2 beside t1 on a node), 300 W a shard."""
    await add_tenant(cluster, "t2")
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(cluster, deployment("wide", replicas=2, accelerators=3, locality="node", shard_power_w=300.0))
    await submit(cluster, deployment("small", tenant="t2", shard_power_w=300.0))
    await loop.reconcile_once()
    await loop.reconcile_once()


async def test_tenant_dry_runs_answer_what_the_write_answers(cluster):
    await _placed(cluster)
    new = TenantSpec("lab-a", "dedicated_rack", excludes=("t2",), zones=("z1",), max_accelerators=8.0)
    dry = await _dry(cluster, lambda uow, s, **kw: tenants.create_tenant(uow, WHO, new, s, **kw))
    assert dry == await _real(cluster, lambda uow, s: tenants.create_tenant(uow, WHO, new, s))
    changed = TenantSpec("t1", max_accelerators=64.0, reserved_accelerators=2.0)
    dry = await _dry(cluster, lambda uow, s, **kw: tenants.update_tenant(uow, WHO, changed, s, **kw))
    assert dry.usage.accelerators == 6.0  # what it holds now, as the update answers it
    assert dry == await _real(cluster, lambda uow, s: tenants.update_tenant(uow, WHO, changed, s))


@pytest.mark.parametrize(
    ("spec", "update", "error", "message"),
    [
        (TenantSpec("lab-x", zones=("mars",)), False, NotFound, "tenant lab-x names unknown zone(s): mars"),
        (TenantSpec("t1", "dedicated_node"), True, FailedPrecondition,
         "tenant t1: the new contract is broken by what runs now: node "),
        (TenantSpec("t1", excludes=("t2",)), True, FailedPrecondition, "holds excluded t2"),
    ],
)
async def test_tenant_dry_runs_refuse_what_the_write_refuses(cluster, spec, update, error, message):
    await _placed(cluster)
    call = tenants.update_tenant if update else tenants.create_tenant
    before = await every_row(cluster)
    for dry_run in (True, False):
        with pytest.raises(error) as refused:
            async with cluster.unit_of_work() as uow:
                await call(uow, WHO, spec, RecordingSignals(), dry_run=dry_run)
        assert message in refused.value.message
    assert await every_row(cluster) == before


async def test_topology_dry_run_answers_the_topology_as_applied(cluster):
    """An upsert: a new zone, row and rack; a rack moved to the new row carries its nodes and
    their power there (the rows' power is their racks')."""
    await _placed(cluster)
    async with cluster.unit_of_work() as uow:
        stored = await topology.get_topology(uow, WHO)
    assert {k.spec.id: k.power_used_w for k in stored.racks}["rack-b"] > 0  # something to move
    spec = TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2", 90_000.0),),
                        racks=(RackSpec("rack-b", "row-b", 20_000.0), RackSpec("rack-c", "row-b")))
    dry = await _dry(cluster, lambda uow, s, **kw: topology.apply_topology(uow, WHO, spec, s, **kw))
    assert dry == await _real(cluster, lambda uow, s: topology.apply_topology(uow, WHO, spec, s))
    assert [r.spec.id for r in dry.rows] == ["row-a", "row-b"] and [z.id for z in dry.zones] == ["z1", "z2"]
    with pytest.raises(NotFound, match="unknown row"):
        await _dry(cluster, lambda uow, s, **kw: topology.apply_topology(
            uow, WHO, TopologySpec(racks=(RackSpec("rack-x", "row-nope"),)), s, **kw))


@pytest.mark.parametrize("spec", [
    deployment("wide", replicas=3, accelerators=3, locality="node", shard_power_w=300.0),  # scales
    deployment("wide", replicas=2, accelerators=2, locality="node", shard_power_w=300.0),  # rolls
], ids=["scale", "roll"])
async def test_update_dry_run_answers_what_the_update_answers(cluster, spec):
    await _placed(cluster)
    async with cluster.unit_of_work() as uow:
        version = (await repo.get_deployment(uow.session, "t1", "wide")).resource_version
    dry = await _dry(cluster, lambda uow, s, **kw: updates.update_deployment(
        uow, WHO, spec, version, s, request_id="dry-1", **kw))
    real = await _real(cluster, lambda uow, s: updates.update_deployment(uow, WHO, spec, version, s,
                                                                         request_id="dry-1"))
    assert (dry.changes, dry.rolling) == (real.changes, real.rolling) and dry.changes
    # The new spec, revision and resource version; its updated_at is when the write happens.
    assert replace(dry.deployment, updated_at=real.deployment.updated_at) == real.deployment


async def test_update_dry_run_refuses_over_the_tenants_cap(cluster):
    await _placed(cluster)
    async with cluster.unit_of_work() as uow:
        await tenants.update_tenant(uow, WHO, TenantSpec("t1", max_accelerators=7.0), RecordingSignals())
        version = (await repo.get_deployment(uow.session, "t1", "wide")).resource_version
    more = deployment("wide", replicas=3, accelerators=3, locality="node", shard_power_w=300.0)
    with pytest.raises(ResourceExhausted, match="9 accelerators > max_accelerators 7"):
        await _dry(cluster, lambda uow, s, **kw: updates.update_deployment(uow, WHO, more, version, s, **kw))


async def test_a_topology_change_that_overdraws_a_rack_or_row_is_refused(cluster):
    """A rack budget lowered below what its nodes and shards use was taken silently (the
    reconciler never moves placed work for a budget: 113 % of it stood). Refused, as the write
    and as its dry run, naming where; raising a budget, or one already over, is not judged."""
    await _placed(cluster)
    async with cluster.unit_of_work() as uow:
        stored = {k.spec.id: k.power_used_w for k in (await topology.get_topology(uow, WHO)).racks}
    used = stored["rack-a"]
    assert used > 0
    lower = TopologySpec(racks=(RackSpec("rack-a", "row-a", used - 100.0),))
    moved = TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2", 1.0),),
                         racks=(RackSpec("rack-b", "row-b"),))
    for spec, where in ((lower, "rack rack-a uses"), (moved, "row row-b uses")):
        before = await every_row(cluster)
        for dry_run in (True, False):
            with pytest.raises(FailedPrecondition, match=where):
                async with cluster.unit_of_work() as uow:
                    await topology.apply_topology(uow, WHO, spec, RecordingSignals(), dry_run=dry_run)
        assert await every_row(cluster) == before
    fits = TopologySpec(racks=(RackSpec("rack-a", "row-a", used),))  # exactly what it uses: taken
    assert (await _real(cluster, lambda uow, s: topology.apply_topology(uow, WHO, fits, s))).racks
