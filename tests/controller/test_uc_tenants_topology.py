"""Tenant and topology use cases against a migrated database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from controller.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from controller.identity import Principal, Role
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store import snapshot
from controller.store import tokens as token_store
from controller.usecases import deployments, tenants, tokens, topology
from controller.domain.values import RackSpec, RowSpec, TenantSpec, TokenRequest, TopologySpec, ZoneSpec
from controller.usecases.ports import RecordingSignals
from uc_builders import (
    WHO, add_nodes, add_tenant, apply_topology, assert_refused_writing_nothing, deployment, no_publish, statements,
    submit,
)


async def test_create_get_list_tenant_with_usage(database):
    await apply_topology(database)
    signals = RecordingSignals()
    async with database.unit_of_work() as uow:
        view = await tenants.create_tenant(
            uow, WHO, TenantSpec("lab-a", "dedicated_rack", zones=("z1",), max_accelerators=8.0), signals)
    assert view.spec.isolation == "dedicated_rack" and signals.wakes == 1
    await add_tenant(database, "lab-b", excludes=("lab-a",))
    async with database.unit_of_work() as uow:
        got = await tenants.get_tenant(uow, WHO, "lab-b")
        listed = (await tenants.list_tenants(uow, WHO)).items
    assert got.spec.excludes == ("lab-a",)
    assert [t.spec.id for t in listed] == ["lab-a", "lab-b"]
    assert listed[0].spec.max_accelerators == 8.0 and listed[0].usage.accelerators == 0.0


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (TenantSpec("lab-x", excludes=("ghost",)), NotFound, "tenant lab-x excludes unknown tenant(s): ghost"),
        (TenantSpec("lab-x", zones=("mars",)), NotFound, "tenant lab-x names unknown zone(s): mars"),
        (TenantSpec("lab-x", max_power_w=-1.0), InvalidArgument, "tenant lab-x: max_power_w must be >= 0, got -1"),
        (TenantSpec("lab-x", isolation="paranoid"), InvalidArgument, "isolation 'paranoid' is not one of"),
        (TenantSpec("lab-x", excludes=("lab-x",)), InvalidArgument, "tenant lab-x cannot exclude itself"),
        (TenantSpec("", ), InvalidArgument, "tenant id is required"),
        (TenantSpec("lab-x", reserved_accelerators=9.0, max_accelerators=8.0), InvalidArgument,
         "reserved_accelerators 9 exceeds max_accelerators 8"),
    ],
)
async def test_bad_tenant_is_refused_and_nothing_written(database, spec, error, message):
    await apply_topology(database)
    await assert_refused_writing_nothing(
        database, lambda uow: tenants.create_tenant(uow, WHO, spec, RecordingSignals()), error, message)


async def test_duplicate_tenant_already_exists(database):
    await add_tenant(database, "lab-a")
    with pytest.raises(AlreadyExists, match="tenant lab-a already exists"):
        async with database.unit_of_work() as uow:
            await tenants.create_tenant(uow, WHO, TenantSpec("lab-a"), RecordingSignals())


async def test_update_and_delete_tenant(database):
    await apply_topology(database)
    await add_tenant(database, "lab-a")
    await add_tenant(database, "lab-b", excludes=("lab-a",))
    async with database.unit_of_work() as uow:
        view = await tenants.update_tenant(uow, WHO, TenantSpec("lab-a", "dedicated_node"), RecordingSignals())
    assert view.spec.isolation == "dedicated_node"
    with pytest.raises(NotFound, match="tenant nobody not found"):
        async with database.unit_of_work() as uow:
            await tenants.update_tenant(uow, WHO, TenantSpec("nobody"), RecordingSignals())
    async with database.unit_of_work() as uow:
        await tenants.delete_tenant(uow, WHO, "lab-a", RecordingSignals())
    async with database.unit_of_work() as uow:
        remaining = (await tenants.list_tenants(uow, WHO)).items
    assert [t.spec.id for t in remaining] == ["lab-b"]
    assert remaining[0].spec.excludes == ()  # the exclusion of a deleted tenant goes with it
    # ... said on the tenant that lost it (it vanished silently) and in the deletion's event.
    async with database.unit_of_work() as uow:
        events = (await uow.session.execute(select(m.Event.kind, m.Event.object_id, m.Event.message, m.Event.data)
                                            .order_by(m.Event.id))).all()
    updated = [e for e in events if e.kind == "tenant.updated" and e.object_id == "lab-b"]
    assert [e.data for e in updated] == [{"excludes_dropped": ["lab-a"]}]
    assert "excludes no longer lists lab-a: it was deleted" == updated[0].message
    deleted = [e for e in events if e.kind == "tenant.deleted"]
    assert [e.data.get("excluded_by") for e in deleted] == [["lab-b"]]


async def test_delete_tenant_with_deployments_is_refused(database):
    await apply_topology(database)
    await add_tenant(database, "lab-a")
    async with database.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("svc", "lab-a"), RecordingSignals())
    await assert_refused_writing_nothing(
        database, lambda uow: tenants.delete_tenant(uow, WHO, "lab-a", RecordingSignals()),
        FailedPrecondition, "tenant lab-a has 1 deployment(s); delete them first")


async def test_apply_topology_upserts_and_reports_power(database):
    await apply_topology(database, {"rack-a": "row-a"}, rack_budget_w=10_000)
    spec = TopologySpec(rows=(RowSpec("row-a", "z1", 50_000.0),), racks=(RackSpec("rack-a", "row-a", 12_000.0),
                                                                         RackSpec("rack-b", "row-a")))
    async with database.unit_of_work() as uow:
        view = await topology.apply_topology(uow, WHO, spec, RecordingSignals())
    assert [(r.spec.id, r.spec.power_budget_w) for r in view.racks] == [("rack-a", 12_000.0), ("rack-b", None)]
    assert view.rows[0].spec.power_budget_w == 50_000.0
    assert [z.id for z in view.zones] == ["z1"]
    # What changed, in the event (its message said "0 zones, 1 rows, 2 racks": a budget cut or a
    # move left no before and after).
    async with database.unit_of_work() as uow:
        message, data = (await uow.session.execute(select(m.Event.message, m.Event.data).where(
            m.Event.kind == "topology.applied").order_by(m.Event.id.desc()))).first()
    assert message == ("row row-a: power_budget_w none -> 50000; rack rack-a: power_budget_w 10000 -> 12000; "
                       "rack rack-b: added")
    assert data == {"changed": {"row row-a": {"power_budget_w": [None, 50_000.0]},
                                      "rack rack-a": {"power_budget_w": [10_000, 12_000.0]}, "rack rack-b": {}}}


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (TopologySpec(rows=(RowSpec("row-x", "nowhere"),)), NotFound,
         "unknown zone(s) nowhere (row row-x -> zone nowhere)"),
        (TopologySpec(racks=(RackSpec("rack-x", "row-nope"),)), NotFound,
         "unknown row(s) row-nope (rack rack-x -> row row-nope)"),
        (TopologySpec(zones=(ZoneSpec("z2"),), racks=(RackSpec("rack-x", "row-a", -5.0),)), InvalidArgument,
         "rack rack-x: power_budget_w must be >= 0, got -5"),
        (TopologySpec(zones=(ZoneSpec("z2"), ZoneSpec("z2"))), InvalidArgument, "zone 'z2' is listed twice"),
    ],
)
async def test_bad_topology_is_refused_and_nothing_written(database, spec, error, message):
    await apply_topology(database, {"rack-a": "row-a"})
    await assert_refused_writing_nothing(
        database, lambda uow: topology.apply_topology(uow, WHO, spec, RecordingSignals()), error, message)


async def test_a_stricter_contract_that_what_runs_breaks_is_refused(cluster):
    """A tenant sharing nodes made dedicated_node (or given an exclusion of a tenant beside it) was
    accepted, and the shared nodes stood as an isolation violation (the watchdog's alarm) with
    nothing moving: the reconciler never moves placed work for a contract. Refused, naming where,
    writing nothing; a change that makes nothing stricter is taken as before."""
    await add_tenant(cluster, "t2")
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(cluster, deployment("wide", replicas=4, accelerators=3, locality="node"))  # 3 of 4 on each node
    await submit(cluster, deployment("small", tenant="t2"))  # so beside t1 on one node
    await loop.reconcile_once()
    await loop.reconcile_once()

    def update(spec: TenantSpec):  # noqa: ANN202
        return lambda uow: tenants.update_tenant(uow, WHO, spec, RecordingSignals())

    await assert_refused_writing_nothing(cluster, update(TenantSpec("t1", "dedicated_node")), FailedPrecondition,
                                         "tenant t1: the new contract is broken by what runs now: node ")
    await assert_refused_writing_nothing(cluster, update(TenantSpec("t2", "dedicated_rack")), FailedPrecondition,
                                         "holds t1 too")
    await assert_refused_writing_nothing(cluster, update(TenantSpec("t1", excludes=("t2",))), FailedPrecondition,
                                         "holds excluded t2")
    with pytest.raises(FailedPrecondition) as refused:
        async with cluster.unit_of_work() as uow:
            await tenants.update_tenant(uow, WHO, TenantSpec("t1", "dedicated_node"), RecordingSignals())
    assert [r.code for r in refused.value.reasons] == ["ISOLATION"]
    with statements(cluster) as seen:  # nothing stricter: taken
        async with cluster.unit_of_work() as uow:
            view = await tenants.update_tenant(uow, WHO, TenantSpec("t1", max_accelerators=64.0), RecordingSignals())
    assert view.spec.max_accelerators == 64.0
    assert not [s for s in seen if "rows.zone_id" in s]  # and what runs around it is not read (placed_beside)


async def test_a_stricter_contract_is_checked_again_against_a_plan_that_landed_meanwhile(cluster, monkeypatch):
    """The check of what runs holds no lock: a plan commit that landed between it and the write
    was checked against the old contract, and the exclusion was accepted with the excluded
    tenant's shard beside it, for good (found in review, as for the topology)."""
    await add_tenant(cluster, "t2")
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(cluster, deployment("wide", replicas=4, accelerators=3, locality="node"))  # 1 free on each node
    await loop.reconcile_once()
    await submit(cluster, deployment("small", tenant="t2"))  # pending: it can only go beside t1
    read = repo.placed_beside
    landed: list[object] = []

    async def then_a_plan_lands(session, tenant_id):  # noqa: ANN001, ANN202
        beside = await read(session, tenant_id)
        if not landed:
            landed.append(await loop.reconcile_once())  # t2's shard committed beside t1 meanwhile
        return beside

    monkeypatch.setattr(repo, "placed_beside", then_a_plan_lands)
    with pytest.raises(FailedPrecondition, match="holds excluded t2"):
        async with cluster.unit_of_work() as uow:
            await tenants.update_tenant(uow, WHO, TenantSpec("t1", excludes=("t2",)), RecordingSignals())
    assert landed
    async with cluster.unit_of_work() as uow:
        assert (await repo.get_tenant(uow.session, "t1")).excludes in (None, [])


async def test_moving_a_rack_or_a_row_under_work_it_would_break_is_refused(cluster):
    """A rack moved to another row or a row to another zone was accepted under placed work that
    then broke its locality or its tenant's zones, nothing moving it (found by exploratory testing:
    only the zones raised the watchdog's alarm). Refused, naming the work, writing nothing; a move
    under nothing is taken."""
    await add_tenant(cluster, "t2", zones=("z1",))
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(cluster, deployment("gang", shards=3, accelerators=4, locality="row"))  # 12 of rack-a's and -b's 16
    await submit(cluster, deployment("small", tenant="t2"))
    await loop.reconcile_once()
    await loop.reconcile_once()
    z2 = TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2"),))
    async with cluster.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, z2, RecordingSignals())

    def apply(spec: TopologySpec):  # noqa: ANN202
        return lambda uow: topology.apply_topology(uow, WHO, spec, RecordingSignals())

    await assert_refused_writing_nothing(
        cluster, apply(TopologySpec(racks=(RackSpec("rack-b", "row-b"),))), FailedPrecondition,
        "the topology change moves racks or rows under work that runs now: t1/gang replica 0 (row-local) across "
        "rows row-a, row-b")
    with pytest.raises(FailedPrecondition) as refused:
        async with cluster.unit_of_work() as uow:
            await topology.apply_topology(uow, WHO, TopologySpec(rows=(RowSpec("row-a", "z2"),)), RecordingSignals(),
                                          dry_run=True)
    assert [(r.code, r.message) for r in refused.value.reasons] == [
        ("ZONE", "t2/small in zone z2, outside tenant t2's zones (z1)")]
    async with cluster.unit_of_work() as uow:  # a rack nothing runs on moves
        await topology.apply_topology(uow, WHO, TopologySpec(racks=(RackSpec("rack-c", "row-a"),)), RecordingSignals())
    async with cluster.unit_of_work() as uow:
        view = await topology.apply_topology(uow, WHO, TopologySpec(racks=(RackSpec("rack-c", "row-b"),)),
                                             RecordingSignals())
    assert {k.spec.id: k.spec.row for k in view.racks}["rack-c"] == "row-b"


async def _gang_and_far(db) -> None:  # noqa: ANN001
    """On `cluster`, row-b (zone z2) with rack-c of two nodes; t1/gang (row-local, three shards of
    a whole node) on three of row-a's four nodes, so across rack-a and rack-b; t2/far (z2 only) on
    rack-c."""
    async with db.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2"),),
                                                             racks=(RackSpec("rack-c", "row-b"),)), RecordingSignals())
    await add_tenant(db, "t2", zones=("z2",))
    await add_nodes(db, "rack-c", 2)
    loop = Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(db, deployment("gang", shards=3, accelerators=4, locality="row"))
    await submit(db, deployment("far", tenant="t2"))
    await loop.reconcile_once()
    await loop.reconcile_once()


def _whole_cluster_unread(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], list[str]]]:
    """Reading the whole cluster fails; each read of the work on moved racks: (racks, deployments)."""
    async def whole(session):  # noqa: ANN001, ANN202
        raise AssertionError("a move's check read the whole cluster")

    read, reads = topology.load_work_on_racks, []

    async def scoped(session, racks):  # noqa: ANN001, ANN202
        work = await read(session, racks)
        reads.append((list(racks), sorted(d["id"] for d in work["deployments"])))
        return work

    monkeypatch.setattr(snapshot, "read_snapshot_rows", whole)
    monkeypatch.setattr(topology, "load_work_on_racks", scoped)
    return reads


async def test_a_move_reads_the_work_on_the_racks_it_moves_not_the_cluster(cluster, monkeypatch):
    """A move's check read the whole cluster (every node, deployment and placement: ~1-2 s at
    16,384 nodes), again while holding the generation, every commit waiting. It reads the
    deployments with a shard on a moved rack, all their shards, their nodes and tenants."""
    await _gang_and_far(cluster)
    reads = _whole_cluster_unread(monkeypatch)
    async with cluster.unit_of_work() as uow:
        work = await snapshot.load_work_on_racks(uow.session, ["rack-b"])
    assert [d["id"] for d in work["deployments"]] == ["t1/gang"]
    assert [t["id"] for t in work["tenants"]] == ["t1"]
    on = sorted(p["node"] for p in work["placements"])  # its shard on rack-a too
    assert len(on) == 3 and {n.split("-n")[0] for n in on} == {"rack-a", "rack-b"}
    assert sorted(n["id"] for n in work["nodes"]) == on
    async with cluster.unit_of_work() as uow:  # a row moved: the work on its racks
        work = await snapshot.load_work_on_racks(uow.session, ["rack-c", "rack-d"])
    assert ([d["id"] for d in work["deployments"]], [n["id"] for n in work["nodes"]]) == (
        ["t2/far"], [p["node"] for p in work["placements"]])

    async with cluster.unit_of_work() as uow:  # in z2 still: far keeps its zone, taken
        await topology.apply_topology(uow, WHO, TopologySpec(rows=(RowSpec("row-c", "z2"),),
                                                             racks=(RackSpec("rack-c", "row-c"),)), RecordingSignals())
    assert reads == [(["rack-c"], ["t2/far"])] * 2  # checked, then again holding the generation


async def test_a_move_under_a_replica_across_a_moved_rack_and_one_that_stays_is_refused(cluster, monkeypatch):
    """The work on a moved rack is judged with all its shards: gang's replica on rack-a and
    rack-b, rack-b moved to row-b, would stand across two rows (its shards on rack-b alone would
    not); far, on rack-c, is not read."""
    await _gang_and_far(cluster)
    reads = _whole_cluster_unread(monkeypatch)
    with pytest.raises(FailedPrecondition) as refused:
        async with cluster.unit_of_work() as uow:
            await topology.apply_topology(uow, WHO, TopologySpec(racks=(RackSpec("rack-b", "row-b"),)),
                                          RecordingSignals())
    assert [(r.code, r.message) for r in refused.value.reasons] == [
        ("LOCALITY", "t1/gang replica 0 (row-local) across rows row-a, row-b")]
    assert reads == [(["rack-b"], ["t1/gang"])]
    async with cluster.unit_of_work() as uow:
        assert {k.spec.id: k.spec.row for k in (await topology.get_topology(uow, WHO)).racks}["rack-b"] == "row-a"


async def _three_rows(db) -> dict[str, float]:  # noqa: ANN001
    """On `cluster` (row-a: rack-a, rack-b), row-b with rack-c (two nodes) and rack-d (none) and
    row-c with rack-e (two nodes), 500 W idle a node, and t1/hot's 4 kW placed: each rack's and
    row's power as `get_topology` reads it, over the whole cluster ('rack R' / 'row W' -> watts)."""
    async with db.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(
            rows=(RowSpec("row-b", "z1"), RowSpec("row-c", "z1")),
            racks=(RackSpec("rack-c", "row-b"), RackSpec("rack-d", "row-b"), RackSpec("rack-e", "row-c"))),
            RecordingSignals())
    for rack in ("rack-c", "rack-e"):
        await add_nodes(db, rack, 2)
    loop = Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000, backoff_s=0.0)
    await submit(db, deployment("hot", accelerators=4, shard_power_w=1000.0, locality="node"))
    await loop.reconcile_once()
    async with db.unit_of_work() as uow:
        view = await topology.get_topology(uow, WHO)
    assert sum(k.power_used_w for k in view.racks) == 8 * 500.0 + 4000.0  # placed
    return {f"rack {k.spec.id}": k.power_used_w for k in view.racks} | {
        f"row {r.spec.id}": r.power_used_w for r in view.rows}


def _power_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[str] | None]:
    """Each read of power placed (`repo.power_usage`): the racks it names, or None for every rack."""
    read, reads = repo.power_usage, []

    async def recorded(session, racks=None):  # noqa: ANN001, ANN202
        reads.append(None if racks is None else sorted(racks))
        return await read(session, racks)

    monkeypatch.setattr(repo, "power_usage", recorded)
    return reads


async def test_a_budget_cut_or_a_move_reads_the_power_of_the_racks_and_rows_it_changes(cluster, monkeypatch):
    """An apply's checks read every rack's power, summed over the whole cluster (50-90 ms at 16,384
    nodes), the second time holding the generation, every commit waiting. They read that of a
    rack whose budget changes, and of every rack of a row whose budget or racks change (its
    power is theirs): rack-c leaving row-b (rack-d stays) for row-c (rack-e); none for a row
    moved to another zone. The answer is still the whole topology."""
    await _three_rows(cluster)
    reads = _power_reads(monkeypatch)
    for spec, judged in [
        (TopologySpec(racks=(RackSpec("rack-a", "row-a", 90_000.0),)), ["rack-a"]),
        (TopologySpec(rows=(RowSpec("row-a", "z1", 90_000.0),)), ["rack-a", "rack-b"]),
        (TopologySpec(racks=(RackSpec("rack-c", "row-c"),)), ["rack-c", "rack-d", "rack-e"]),
        (TopologySpec(zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2"),)), None),
    ]:
        reads.clear()
        async with cluster.unit_of_work() as uow:
            view = await topology.apply_topology(uow, WHO, spec, RecordingSignals())
        checked = [judged, judged] if judged else []  # checked, then again holding the generation
        assert reads == checked + [None]  # and the answer, the whole topology
        assert sum(k.power_used_w for k in view.racks) == 8_000.0 and len(view.racks) == 5


def _over(where: str, used_w: float, budget_w: float) -> str:
    return f"{where} uses {used_w / 1000:g} kW (up nodes' idle power and placed shards), over its budget of " \
           f"{budget_w / 1000:g} kW"


async def test_a_budget_cut_or_a_move_over_what_runs_is_refused_by_the_whole_cluster_s_numbers(cluster):
    """Judged by the power of the racks and rows it changes alone, an apply is refused as when it
    read the whole cluster's: a rack's budget cut below what it holds; a row's below what all its
    racks hold, rack-b too, which the apply does not name; a rack moved into a row without room
    for it (rack-a and rack-b, which stay, and rack-c). Each naming the power `get_topology` reads."""
    used = await _three_rows(cluster)
    rack_a, row_a, moved = used["rack rack-a"], used["row row-a"], used["row row-a"] + used["rack rack-c"]

    def apply(spec: TopologySpec):  # noqa: ANN202
        return lambda uow: topology.apply_topology(uow, WHO, spec, RecordingSignals())

    await assert_refused_writing_nothing(
        cluster, apply(TopologySpec(racks=(RackSpec("rack-a", "row-a", rack_a - 100.0),))), FailedPrecondition,
        _over("rack rack-a", rack_a, rack_a - 100.0))
    await assert_refused_writing_nothing(
        cluster, apply(TopologySpec(rows=(RowSpec("row-a", "z1", row_a - 100.0),),
                                    racks=(RackSpec("rack-a", "row-a", 90_000.0),))), FailedPrecondition,
        _over("row row-a", row_a, row_a - 100.0))
    async with cluster.unit_of_work() as uow:  # what row-a holds exactly: taken
        await topology.apply_topology(uow, WHO, TopologySpec(rows=(RowSpec("row-a", "z1", row_a),)),
                                      RecordingSignals())
    await assert_refused_writing_nothing(
        cluster, apply(TopologySpec(racks=(RackSpec("rack-c", "row-a"),))), FailedPrecondition,
        _over("row row-a", moved, row_a))


async def _delete_item(db, kind: str, item_id: str, who=WHO):
    async with db.unit_of_work() as uow:
        return await topology.delete_item(uow, who, kind, item_id, RecordingSignals())


@pytest.mark.parametrize(
    ("kind", "item", "error", "message"),
    [
        ("rack", "rack-a", FailedPrecondition, "rack rack-a holds 2 node(s): rack-a-n0, rack-a-n1; delete or "
                                               "re-register them elsewhere"),
        ("row", "row-a", FailedPrecondition, "row row-a holds 2 rack(s): rack-a, rack-b; delete them first"),
        ("zone", "z1", FailedPrecondition, "zone z1 holds 1 row(s): row-a; delete them first"),
        ("rack", "rack-z", NotFound, "rack rack-z not found"),
        ("zone", "bad id!", InvalidArgument, "zone id 'bad id!' is invalid"),
    ],
)
async def test_a_rack_row_or_zone_that_holds_something_is_not_deleted(cluster, kind, item, error, message):
    await assert_refused_writing_nothing(
        cluster, lambda uow: topology.delete_item(uow, WHO, kind, item, RecordingSignals()), error, message)


async def test_a_zone_a_tenant_s_contract_names_is_not_deleted(cluster):
    async with cluster.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(zones=(ZoneSpec("z2"),)), RecordingSignals())
    await add_tenant(cluster, "lab-z", zones=("z1", "z2"))
    await assert_refused_writing_nothing(
        cluster, lambda uow: topology.delete_item(uow, WHO, "zone", "z2", RecordingSignals()), FailedPrecondition,
        "zone z2 is named by the contract of tenant(s) lab-z; update their zones first")


async def test_deleting_an_empty_rack_row_and_zone_removes_them_and_says_so(cluster):
    async with cluster.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(
            zones=(ZoneSpec("z2"),), rows=(RowSpec("row-b", "z2", 50_000.0),),
            racks=(RackSpec("rack-c", "row-b", 20_000.0),)), RecordingSignals())
        generation = await repo.read_cluster_generation(uow.session)
    with pytest.raises(FailedPrecondition):  # its rack first
        await _delete_item(cluster, "row", "row-b")
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        after = await topology.delete_item(uow, WHO, "rack", "rack-c", signals)
    assert [k.spec.id for k in after.racks] == ["rack-a", "rack-b"] and signals.wakes == 1
    after = await _delete_item(cluster, "row", "row-b")
    after = await _delete_item(cluster, "zone", "z2")
    assert [r.spec.id for r in after.rows] == ["row-a"] and [z.id for z in after.zones] == ["z1"]
    async with cluster.unit_of_work() as uow:
        assert await repo.read_cluster_generation(uow.session) == generation + 3  # the solver's view moved
        told = [(e.kind, e.message) for e in await repo.list_events(uow.session, object_kind="topology")]
    assert told[-3:] == [("topology.deleted", "rack rack-c removed"), ("topology.deleted", "row row-b removed"),
                         ("topology.deleted", "zone z2 removed")]
    with pytest.raises(NotFound, match="rack rack-c not found"):
        await _delete_item(cluster, "rack", "rack-c")


async def test_only_an_admin_deletes_topology(cluster):
    lab = Principal("lab", Role.TENANT, tenant="t1")
    with pytest.raises(PermissionDenied):
        await _delete_item(cluster, "rack", "rack-a", who=lab)


async def test_a_zone_deleted_while_a_tenant_is_created_naming_it_never_leaves_the_tenant_naming_nothing(
        cluster, monkeypatch):
    async with cluster.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, TopologySpec(zones=(ZoneSpec("z2"),)), RecordingSignals())
    checked, go = asyncio.Event(), asyncio.Event()
    real = repo.existing_ids

    async def paused_after_the_zone_check(session, model, ids, **kw):
        found = await real(session, model, ids, **kw)
        if model is m.Zone and not checked.is_set():  # the tenant's check read z2; the deletion goes now
            checked.set()
            await go.wait()
        return found

    monkeypatch.setattr(repo, "existing_ids", paused_after_the_zone_check)

    async def create() -> None:
        async with cluster.unit_of_work() as uow:
            await tenants.create_tenant(uow, WHO, TenantSpec("lab-z", zones=("z2",)), RecordingSignals())

    async def delete() -> None:
        await checked.wait()
        # On PostgreSQL the deletion waits for the tenant's transaction (its key share on z2), which
        # waits here: let it go on after a while (an idle transaction is ended by the server).
        asyncio.get_running_loop().call_later(0.5, go.set)
        try:
            await _delete_item(cluster, "zone", "z2")
        finally:
            go.set()

    created, deleted = await asyncio.gather(asyncio.wait_for(create(), 30), asyncio.wait_for(delete(), 30),
                                            return_exceptions=True)
    # PostgreSQL: the deletion waits for the tenant's key share, then sees it and refuses; SQLite:
    # the deletion lands first, and the tenant's write finds the zone gone.
    assert [type(outcome) for outcome in (created, deleted)] in ([type(None), FailedPrecondition],
                                                                  [NotFound, type(None)]), (created, deleted)
    async with cluster.unit_of_work() as uow:
        zones = await repo.existing_ids(uow.session, m.Zone, ["z2"])
        named = await repo.tenants_naming_zone(uow.session, "z2")
    assert (zones, named) in (({"z2"}, ["lab-z"]), (set(), []))


def _meanwhile(monkeypatch: pytest.MonkeyPatch, module, name: str, other) -> list:  # noqa: ANN001
    """`other()` started in a task of its own once `module.name` ran (its first call), given a
    moment to run as far as it can before the caller goes on; the task's outcome in the list."""
    real, started = getattr(module, name), []

    async def then_other(*args, **kwargs):  # noqa: ANN002, ANN003
        result = await real(*args, **kwargs)
        if not started:
            started.append(asyncio.create_task(other()))
            await asyncio.sleep(0.3)
        return result

    monkeypatch.setattr(module, name, then_other)
    return started


async def _outcome(call) -> object:  # noqa: ANN001
    try:
        return await call
    except Exception as exc:  # noqa: BLE001
        return exc


async def _delete_tenant(db, tenant: str) -> None:  # noqa: ANN001
    async with db.unit_of_work() as uow:
        await tenants.delete_tenant(uow, WHO, tenant, RecordingSignals())


async def test_an_exclusion_written_while_its_tenant_is_deleted_never_outlives_it(database, monkeypatch):
    """The exclusion was checked, the excluded tenant deleted, then the exclusion written: a
    contract naming a tenant that is gone, and the solver refused every full pass's problem."""
    await apply_topology(database)
    await add_tenant(database, "t1")
    await add_tenant(database, "t2")
    deleting = _meanwhile(monkeypatch, tenants, "_check_zones", lambda: _delete_tenant(database, "t2"))

    async def exclude() -> None:
        async with database.unit_of_work() as uow:
            await tenants.update_tenant(uow, WHO, TenantSpec(id="t1", excludes=("t2",)), RecordingSignals())

    updated = await _outcome(exclude())
    deleted = await _outcome(deleting[0])
    async with database.unit_of_work() as uow:
        ids = {row.id: list(row.excludes or ()) for row in await repo.list_tenant_rows(uow.session)}
    assert deleted is None and ids == {"t1": []}  # either the deletion dropped the exclusion, or ...
    assert updated is None or isinstance(updated, NotFound)  # ... the exclusion was refused: t2 is gone


async def test_a_token_made_while_its_tenant_is_deleted_does_not_serve_the_next_customer(database, monkeypatch):
    await apply_topology(database)
    await add_tenant(database, "t2")
    deleting = _meanwhile(monkeypatch, tokens, "_tenant_there", lambda: _delete_tenant(database, "t2"))

    async def make() -> object:
        async with database.unit_of_work() as uow:
            return await tokens.create_token(uow, WHO, TokenRequest(role="tenant", tenant="t2"))

    made = await _outcome(make())
    assert await _outcome(deleting[0]) is None
    await add_tenant(database, "t2")  # a new customer given the id
    async with database.unit_of_work() as uow:
        assert await token_store.active_tokens(uow.session, m.utcnow(), tenant="t2") == []
    assert isinstance(made, NotFound) or made.view.id  # refused, or made and then revoked with its tenant


async def test_a_tenant_id_given_again_starts_with_none_of_the_request_ids_of_its_last_customer(database):
    await apply_topology(database)
    await add_tenant(database, "t2")
    async def submit_as(name: str) -> object:
        async with database.unit_of_work() as uow:
            return await deployments.submit_deployment(uow, WHO, deployment(name, "t2"), RecordingSignals(),
                                                       request_id="deploy-1")

    await submit_as("secret-model")
    async with database.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "secret-model", RecordingSignals(), tenant="t2")
    await Reconciler(database, push=lambda ids: None, publish=no_publish).reconcile_once()
    await _delete_tenant(database, "t2")
    await add_tenant(database, "t2")
    assert (await submit_as("mine")).spec.name == "mine"  # not "already used by tenant t2 ... secret-model"


async def test_a_deployment_submitted_while_its_tenant_is_deleted_refuses_the_deletion_not_internal(
        database, monkeypatch):
    await apply_topology(database)
    await add_tenant(database, "t2")
    submitting = _meanwhile(monkeypatch, repo, "count_tenant_deployments",
                            lambda: submit(database, deployment("late", "t2")))
    deleted = await _outcome(_delete_tenant(database, "t2"))
    submitted = await _outcome(submitting[0])
    assert submitted is None or isinstance(submitted, NotFound), submitted  # not INTERNAL (an IntegrityError)
    async with database.unit_of_work() as uow:
        left = await repo.get_tenant(uow.session, "t2"), await repo.count_tenant_deployments(uow.session, "t2")
    # Refused as a tenant with deployments (the deployment written first), or deleted (the submit refused after).
    assert (isinstance(deleted, FailedPrecondition) and left[0] is not None and left[1] == 1) or \
        (deleted is None and left == (None, 0)), (deleted, left)


async def test_two_tenants_deleted_at_once_are_both_deleted(database, monkeypatch):
    """Each locked its own row, then every row in ascending id: on PostgreSQL one held tb and
    waited for ta, the other held ta and waited for tb, and one was aborted as a deadlock's victim."""
    await apply_topology(database)
    for tenant in ("ta", "tb"):
        await add_tenant(database, tenant)
    count = repo.count_tenant_deployments

    async def slowly(session, tenant_id):  # noqa: ANN001
        await asyncio.sleep(0.3)  # each holds what it locked before the count while the other locks
        return await count(session, tenant_id)

    monkeypatch.setattr(repo, "count_tenant_deployments", slowly)
    assert await asyncio.gather(_delete_tenant(database, "tb"), _delete_tenant(database, "ta")) == [None, None]
    async with database.unit_of_work() as uow:
        assert await repo.list_tenant_rows(uow.session) == []
