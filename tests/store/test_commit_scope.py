"""commit_plan(scope=...): a plan that speaks for some deployments commits exactly what an
unscoped commit of the same decisions would, and reads and writes nothing of the others
beyond what the re-check needs (the rows its landing replicas touch)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Collection
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.changes import ClusterChange
from controller.store import models as m
from controller.store.plans import check as plan_check
from controller.store.plans.check import _solver_ids, _spec_doc
from controller.store.plans.committed import _read_committed
from controller.store.plans.neighbours import _neighbours, _snapshot_neighbours, _specs_since
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.plans import CommitResult, bump_cluster_generation, commit_plan
from controller.store.snapshot import Snapshot, load_snapshot
from scheduler import Placement as PlanPlacement, Plan, Preemption, Reason, Unplaced

from bench.checking import check_state
from bench.commit import rows_read

from .seed import dump, seed_problem

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
# Two rows: row1 holds racks r1a and r1b, row2 holds r2a; three 4-accelerator nodes per rack.
RACKS = {"r1a": "row1", "r1b": "row1", "r2a": "row2"}
NODES = [f"{rack}-n{i}" for rack in RACKS for i in range(3)]


def _cluster(rng: random.Random, deployments: int = 8) -> dict[str, Any]:
    """A random small cluster: rack and row power budgets that bind, tenant quotas, a dedicated_node
    tenant, tenants that exclude each other, deployments of 1-2 shards of 1-2 accelerators; nothing placed."""
    return {
        "version": 1,
        "zones": [{"id": "z1"}],
        "rows": [{"id": "row1", "zone": "z1", "power_budget_w": rng.choice([1200, 1600, None])},
                 {"id": "row2", "zone": "z1", "power_budget_w": 3000}],
        "racks": [{"id": rack, "row": row, "power_budget_w": rng.choice([1200, 1800, None])}
                  for rack, row in RACKS.items()],
        "nodes": [{"id": n, "rack": n.rpartition("-")[0], "accelerators": 4, "idle_power_w": 50} for n in NODES],
        "tenants": [{"id": "a", "max_accelerators": rng.choice([6, 10, None])},
                    {"id": "b", "isolation": "dedicated_node", "max_power_w": rng.choice([1000, 2000, None])},
                    {"id": "c", "excludes": ["a"]}],
        "deployments": [
            {"id": f"{tenant}/d{i}", "tenant": tenant, "replicas": rng.randint(1, 3),
             "shards_per_replica": rng.randint(1, 2),
             "shard": {"accelerators": rng.randint(1, 2), "power_w": rng.choice([100, 200, 300])}}
            for i, tenant in ((i, rng.choice("abc")) for i in range(deployments))
        ],
        "placements": [],
    }


def _random_plan(rng: random.Random, snap: Snapshot, *, keep: float = 0.5) -> Plan:
    """Per solver replica: kept where it is, removed (preempted or not), or (re)placed on random
    accelerators (a plan the re-check may well turn away); reasons for some unplaced replicas."""
    current: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for p in snap.problem["placements"]:
        current[(p["deployment"], p["replica"])].append(p)
    placements: list[PlanPlacement] = []
    preempted: list[Preemption] = []
    unplaced: list[Unplaced] = []
    for d in snap.problem["deployments"]:
        left = 0
        for replica in range(d["replicas"]):
            shards = current.get((d["id"], replica))
            roll = rng.random()
            if shards and roll < keep:
                placements += [PlanPlacement(p["deployment"], p["replica"], p["shard"], p["node"],
                                             tuple(p["accelerator_indices"])) for p in shards]
            elif shards and roll < keep + 0.15:
                if rng.random() < 0.5:
                    preempted.append(Preemption(d["id"], replica))
            elif roll < 0.9:
                rack = rng.choice(list(RACKS))
                placements += [PlanPlacement(d["id"], replica, shard, f"{rack}-n{rng.randrange(3)}",
                                             tuple(sorted(rng.sample(range(4), d["shard"]["accelerators"]))))
                               for shard in range(d["shards_per_replica"])]
            else:
                left += 1
        if left:
            unplaced.append(Unplaced(d["id"], left, (Reason("CAPACITY", f"{left} replica(s) do not fit", "r1a"),)))
    return Plan("feasible", tuple(placements), unplaced=tuple(unplaced), preempted=tuple(preempted))


def _restricted(plan: Plan, snap: Snapshot, scope: Collection[str]) -> Plan:
    """`plan` for the deployments of `scope`; every other deployment left as the snapshot has it."""
    others = tuple(PlanPlacement(p["deployment"], p["replica"], p["shard"], p["node"], tuple(p["accelerator_indices"]),
                                 p.get("accelerator_milli"))
                   for p in snap.problem["placements"] if p["deployment"] not in scope)
    return Plan(plan.status, tuple(p for p in plan.placements if p.deployment in scope) + others,
                unplaced=tuple(u for u in plan.unplaced if u.deployment in scope),
                preempted=tuple(v for v in plan.preempted if v.deployment in scope))


async def _seeded(database: Database, doc: dict[str, Any]) -> Snapshot:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, doc)
        await uow.commit()
    async with database.unit_of_work() as uow:
        return await load_snapshot(uow.session)


async def _commit(database: Database, snap: Snapshot, plan: Plan, scope: Collection[str] | None = None,
                  actor: str = "test") -> CommitResult:
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, scope=scope, actor=actor, now=NOW)
        await uow.commit()
    return result


async def _committed_state(session: AsyncSession) -> dict[str, Any]:
    """Everything a commit writes, without row ids (which a rolled-back commit may have used up)."""
    keys = {d.id: f"{d.tenant_id}/{d.name}" for d in (await session.execute(select(m.Deployment))).scalars()}
    placements = {p.id: (keys[p.deployment_id], p.replica, p.shard)
                  for p in (await session.execute(select(m.Placement))).scalars()}
    return {
        "generation": (await session.execute(select(m.ClusterState.generation))).scalar_one(),
        "placements": {(keys[p.deployment_id], p.replica, p.shard):
                       (p.node_id, tuple(p.accelerator_indices), p.accelerator_milli, p.phase, p.generation, p.revision)
                       for p in (await session.execute(select(m.Placement))).scalars()},
        "deployments": {keys[d.id]: (d.phase, d.generation, d.reasons)
                        for d in (await session.execute(select(m.Deployment))).scalars()},
        "nodes": {n.id: n.assignment_generation for n in (await session.execute(select(m.Node))).scalars()},
        "events": [(e.kind, e.object_id, e.message, e.data, e.actor)
                   for e in (await session.execute(select(m.Event).order_by(m.Event.id))).scalars()],
        "audit": [(a.action, a.object_id, a.tenant, a.detail)
                  for a in (await session.execute(select(m.AuditEntry).order_by(m.AuditEntry.seq))).scalars()],
        "usage": sorted([(placements.get(u.placement_id), u.tenant_id, u.deployment, u.replica, u.shard, u.node_id,
                          u.accelerator_milli, u.load_power_w, u.started_s, u.ended_s)
                         for u in (await session.execute(select(m.UsageInterval))).scalars()], key=repr),
    }


async def _tried(database: Database, snap: Snapshot, plan: Plan,
                 scope: Collection[str] | None) -> tuple[CommitResult, dict[str, Any]]:
    """The result and the state a commit would leave, then rolled back."""
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, scope=scope, actor="test", now=NOW)
        return result, await _committed_state(uow.session)


@pytest.mark.parametrize("seed", range(12))
async def test_a_scoped_commit_lands_what_an_unscoped_commit_of_the_same_decisions_lands(
        database: Database, seed: int) -> None:
    rng = random.Random(seed)
    first = await _seeded(database, _cluster(rng))
    # Some work runs (without reasons: an unscoped commit that leaves a deployment alone clears them).
    await _commit(database, first, Plan("feasible", _random_plan(rng, first).placements), actor="setup")
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    # While the plan is solved, another commit lands and a node may be cordoned: the plan is stale.
    await _commit(database, snap, Plan("feasible", _random_plan(rng, snap, keep=0.8).placements), actor="other")
    async with database.unit_of_work() as uow:
        if rng.random() < 0.5:
            await repo.set_node_cordoned(uow.session, rng.choice(NODES), True)
        await bump_cluster_generation(uow.session)
        await uow.commit()
    plan = _random_plan(rng, snap)
    names = [d["id"] for d in snap.problem["deployments"]]
    scope = set(rng.sample(names, rng.randint(1, len(names) - 1)))

    scoped = await _tried(database, snap, plan, scope)
    unscoped = await _tried(database, snap, _restricted(plan, snap, scope), None)

    assert scoped == unscoped
    assert scoped[0].stale
    assert {key[0] for key in scoped[0].shards} <= scope and {rk[0] for rk in scoped[0].requeued} <= scope


def _plain_cluster(rng: random.Random) -> dict[str, Any]:
    """`_cluster` without power budgets, quotas or a rule of a rack's scope (a tenant dedicated to
    racks, an exclusion): a scoped commit's re-check judges the nodes its replicas land on alone
    and reads the shards beside its scope there alone (`plans.neighbours._judged_alone`)."""
    doc = _cluster(rng, deployments=10)
    doc["rows"] = [{"id": r["id"], "zone": r["zone"]} for r in doc["rows"]]
    doc["racks"] = [{"id": r["id"], "row": r["row"]} for r in doc["racks"]]
    doc["tenants"] = [{"id": "a"}, {"id": "b", "isolation": "dedicated_node"}, {"id": "c"}]
    return doc


@pytest.mark.parametrize("seed", range(4))
async def test_a_scoped_commit_judged_on_the_nodes_alone_lands_what_an_unscoped_commit_lands(
        database: Database, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    first = await _seeded(database, _plain_cluster(rng))
    await _commit(database, first, Plan("feasible", _random_plan(rng, first).placements), actor="setup")
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)  # current: the scoped commit takes the shards beside it from it
    names = [d["id"] for d in snap.problem["deployments"]]
    beside = _snapshot_neighbours
    read_on: list[Any] = []

    def neighbours(*args: Any) -> Any:
        read_on.append(args[4])
        return beside(*args)

    monkeypatch.setattr(plan_check, "_snapshot_neighbours", neighbours)
    requeued = judged = 0
    for _ in range(6):  # (each tried, then rolled back)
        plan = _random_plan(rng, snap)
        scope = set(rng.sample(names, rng.randint(1, len(names) - 1)))
        read_on.clear()

        scoped = await _tried(database, snap, plan, scope)
        unscoped = await _tried(database, snap, _restricted(plan, snap, scope), None)

        assert scoped == unscoped and not scoped[0].stale
        landing = {p.node for p in plan.placements if p.deployment in scope}
        assert all(nodes is not None and nodes <= landing for nodes in read_on)  # the nodes alone, not their racks
        judged += len(read_on)
        requeued += len(scoped[0].requeued)
    assert judged  # the scoped commits did take the shards beside them from the snapshot (else the above says nothing)
    assert requeued  # (plans on random accelerators: some land where others run, and are turned away)


async def test_a_scoped_commit_reads_and_writes_nothing_of_other_deployments_elsewhere(database: Database) -> None:
    # 40 deployments of tenant a fill row1; one new deployment of tenant b is placed in row2.
    doc = {
        **_cluster(random.Random(0), deployments=0),
        "racks": [{"id": rack, "row": row} for rack, row in RACKS.items()],
        "deployments": [{"id": f"a/w{i}", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                         "shard": {"accelerators": 1}} for i in range(24)]
                       + [{"id": "b/new", "tenant": "b", "replicas": 1, "shards_per_replica": 2,
                           "shard": {"accelerators": 2}}],
    }
    doc["placements"] = [{"deployment": f"a/w{i}", "replica": 0, "shard": 0, "node": NODES[i // 4],
                          "accelerator_indices": [i % 4]} for i in range(24)]
    snap = await _seeded(database, doc)
    new = Plan("optimal", (PlanPlacement("b/new", 0, 0, "r2a-n0", (0, 1)),
                           PlanPlacement("b/new", 0, 1, "r2a-n0", (2, 3))))
    plan = _restricted(new, snap, {"b/new"})  # the others stay where they are
    async with database.unit_of_work() as uow:
        before = await dump(uow.session)
    for scope in ({"b/new"}, None):
        async with database.unit_of_work() as uow:
            with rows_read(uow.session) as counts:
                result = await commit_plan(uow.session, snap, plan, scope=scope, now=NOW)
            after = await dump(uow.session)
        assert result.shards == {("b/new", 0, 0): ("r2a-n0", (0, 1), None), ("b/new", 0, 1): ("r2a-n0", (2, 3), None)}
        # The 24 placements and 24 deployments of row1 are read only by the unscoped commit.
        assert sum(counts) <= 10 if scope is not None else sum(counts) >= 48, (scope, counts)
        # ... and written by neither.
        assert after["placements"][:24] == before["placements"][:24]
        assert after["deployments"][:24] == before["deployments"][:24]


async def test_a_scoped_stale_commit_onto_a_node_cordoned_since_is_requeued(database: Database) -> None:
    snap = await _seeded(database, _cluster(random.Random(3)))
    name = snap.problem["deployments"][0]["id"]
    async with database.unit_of_work() as uow:
        await repo.set_node_cordoned(uow.session, "r1a-n1", True)
        await bump_cluster_generation(uow.session)
        await uow.commit()
    shards = snap.problem["deployments"][0]["shards_per_replica"]
    accelerators = snap.problem["deployments"][0]["shard"]["accelerators"]
    plan = Plan("optimal", tuple(PlanPlacement(name, 0, s, "r1a-n1", tuple(range(s * 2, s * 2 + accelerators)))
                                 for s in range(shards)))
    result = await _commit(database, snap, plan, scope={name})
    assert result.stale and result.requeued == {(name, 0): ("node r1a-n1 is cordoned: it takes no new shards",)}
    assert result.shards == {}


@pytest.mark.parametrize("budget, second_node, why", [
    ("rack", "r1a-n1", "POWER: rack r1a draws 1200 W"),
    # The other commit's shard is on a rack the second does not read: the row's total counts it.
    ("row", "r1b-n0", "POWER: row row1 draws 1200 W"),
])
async def test_two_scoped_commits_over_a_power_budget_together_land_one(
        database: Database, budget: str, second_node: str, why: str) -> None:
    # Two tenants' new deployments, each within the budget alone, over it together.
    doc = {**_cluster(random.Random(0), deployments=0),
           "rows": [{"id": "row1", "zone": "z1", **({"power_budget_w": 1000} if budget == "row" else {})},
                    {"id": "row2", "zone": "z1"}],
           "racks": [{"id": "r1a", "row": "row1", **({"power_budget_w": 1000} if budget == "rack" else {})},
                     {"id": "r1b", "row": "row1"}, {"id": "r2a", "row": "row2"}],
           "deployments": [{"id": f"{t}/x", "tenant": t, "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 2, "power_w": 300}} for t in ("a", "c")]}
    doc["nodes"] = [dict(n, idle_power_w=0) for n in doc["nodes"]]
    doc["tenants"] = [{"id": "a"}, {"id": "c"}]
    snap = await _seeded(database, doc)
    plans = [(Plan("optimal", (PlanPlacement("a/x", 0, 0, "r1a-n0", (0, 1)),)), {"a/x"}),
             (Plan("optimal", (PlanPlacement("c/x", 0, 0, second_node, (0, 1)),)), {"c/x"})]
    outcomes = await asyncio.gather(*(_commit(database, snap, plan, scope) for plan, scope in plans))

    turned_away = [why for o in outcomes for why in o.requeued.values()]
    assert len(turned_away) == 1 and turned_away[0][0].startswith(why)
    async with database.unit_of_work() as uow:
        committed = await load_snapshot(uow.session)
    assert len(committed.problem["placements"]) == 1
    assert check_state(committed.problem, committed.problem["placements"]) == []


async def test_a_deployment_being_deleted_goes_only_with_a_scope_naming_it(database: Database) -> None:
    doc = {**_cluster(random.Random(0), deployments=0),
           "deployments": [{"id": f"a/{n}", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 1}} for n in ("keep", "gone", "later")],
           "placements": [{"deployment": f"a/{n}", "replica": 0, "shard": 0, "node": "r1a-n0",
                           "accelerator_indices": [i]} for i, n in enumerate(("keep", "gone", "later"))]}
    await _seeded(database, doc)
    async with database.unit_of_work() as uow:
        for name in ("gone", "later"):
            row = (await uow.session.scalars(select(m.Deployment).where(m.Deployment.name == name))).one()
            row.phase = m.DeploymentPhase.DELETING
        await bump_cluster_generation(uow.session)
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert snap.deleting == {"a/gone", "a/later"}

    result = await _commit(database, snap, Plan("optimal", ()), scope={"a/gone"})

    assert result.deleted_deployments == {"a/gone"} and result.shards == {("a/gone", 0, 0): None}
    async with database.unit_of_work() as uow:
        names = set((await uow.session.scalars(select(m.Deployment.name))).all())
    assert names == {"keep", "later"}  # a/keep: the plan does not speak for it, nothing removed


async def _quota_cluster(database: Database, **caps: Any) -> Snapshot:
    """Tenant a (with `caps`) runs a/old (2 accelerators) in row1; a/x and a/y (1 accelerator,
    100 W each) are new."""
    doc = {**_cluster(random.Random(0), deployments=0),
           "racks": [{"id": rack, "row": row} for rack, row in RACKS.items()],
           "tenants": [{"id": "a", **caps}],
           "deployments": [{"id": f"a/{n}", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": accelerators, "power_w": 100}}
                           for n, accelerators in (("old", 2), ("x", 1), ("y", 1))],
           "placements": [{"deployment": "a/old", "replica": 0, "shard": 0, "node": "r1a-n0",
                           "accelerator_indices": [0, 1]}]}
    return await _seeded(database, doc)


def _one(name: str, node: str, index: int) -> Plan:
    return Plan("optimal", (PlanPlacement(name, 0, 0, node, (index,)),))


async def test_a_scoped_commit_over_a_quota_lowered_since_its_snapshot_is_requeued(database: Database) -> None:
    snap = await _quota_cluster(database, max_accelerators=4)
    async with database.unit_of_work() as uow:  # the contract is cut to 2 accelerators meanwhile
        tenant = await uow.session.get(m.Tenant, "a")
        tenant.max_accelerators = 2
        await bump_cluster_generation(uow.session)
        await uow.commit()
    # a/x lands in row2: a/old (row1, outside the scope) is counted all the same.
    result = await _commit(database, snap, _one("a/x", "r2a-n0", 0), scope={"a/x"})
    assert result.stale and result.requeued == {
        ("a/x", 0): ("QUOTA_ACCELERATORS: tenant a holds 3 accelerators > 2 max_accelerators",)}
    assert result.shards == {}


@pytest.mark.parametrize("caps, why", [
    ({"max_accelerators": 3}, "QUOTA_ACCELERATORS: tenant a holds 4 accelerators > 3 max_accelerators"),
    ({"max_power_w": 300}, "QUOTA_POWER: tenant a draws 400 W > 300 W max_power_w"),
])
async def test_two_scoped_commits_over_a_quota_together_land_one(database: Database, caps: dict[str, Any],
                                                                 why: str) -> None:
    snap = await _quota_cluster(database, **caps)
    outcomes = await asyncio.gather(_commit(database, snap, _one("a/x", "r2a-n0", 0), scope={"a/x"}),
                                    _commit(database, snap, _one("a/y", "r2a-n1", 0), scope={"a/y"}))
    assert sorted(why for o in outcomes for why in o.requeued.values()) == [(why,)]
    assert sum(len(o.shards) for o in outcomes) == 1


async def test_a_deployment_a_cached_snapshot_learnt_without_a_solver_ref_lands(database: Database) -> None:
    snap = await _quota_cluster(database)
    async with database.unit_of_work() as uow:  # a/late arrives after the snapshot
        uow.session.add(m.Deployment(name="late", tenant_id="a", replicas=1, shards_per_replica=1,
                                     shard_accelerators=1, locality=m.Domain.NODE))
        await uow.session.flush()
        late = (await uow.session.scalars(select(m.Deployment.id).where(m.Deployment.name == "late"))).one()
        generation = await bump_cluster_generation(uow.session)
        await uow.commit()
    doc = {"id": "a/late", "tenant": "a", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1}}
    cached = replace(snap, generation=generation, deployment_ids={**snap.deployment_ids, "a/late": late},
                     problem={**snap.problem, "deployments": [*snap.problem["deployments"], doc]})

    result = await _commit(database, cached, _one("a/late", "r2a-n0", 3), scope={"a/late"})

    assert not result.stale and not result.requeued
    assert result.shards == {("a/late", 0, 0): ("r2a-n0", (3,), None)}


async def _rolled_cluster(database: Database) -> None:
    """c/old rolls to a 0 W template; its running shard on r1b keeps revision 1 (300 W an
    accelerator); a/x (2 accelerators, 300 W each) is new; row1 has a 1,000 W budget."""
    doc = {**_cluster(random.Random(0), deployments=0),
           "rows": [{"id": "row1", "zone": "z1", "power_budget_w": 1000}, {"id": "row2", "zone": "z1"}],
           "racks": [{"id": rack, "row": row} for rack, row in RACKS.items()],
           "tenants": [{"id": "a"}, {"id": "c"}],
           "deployments": [{"id": f"{t}/{n}", "tenant": t, "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 2, "power_w": 300}} for t, n in (("a", "x"), ("c", "old"))],
           "placements": [{"deployment": "c/old", "replica": 0, "shard": 0, "node": "r1b-n0",
                           "accelerator_indices": [0, 1]}]}
    doc["nodes"] = [dict(n, idle_power_w=0) for n in doc["nodes"]]
    await _seeded(database, doc)
    async with database.unit_of_work() as uow:
        old = (await uow.session.scalars(select(m.Deployment).where(m.Deployment.name == "old"))).one()
        old.revision_specs = {"1": dict(doc["deployments"][1])}
        old.template_revision, old.shard_power_w = 2, 0.0
        await bump_cluster_generation(uow.session)
        await uow.commit()


async def test_a_row_budget_counts_unread_shards_of_an_older_revision_by_their_own_spec(database: Database) -> None:
    await _rolled_cluster(database)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)

    result = await _commit(database, snap, Plan("optimal", (PlanPlacement("a/x", 0, 0, "r1a-n0", (0, 1)),)),
                           scope={"a/x"})

    assert result.requeued == {("a/x", 0): ("POWER: row row1 draws 1200 W, over its budget of 1000 W",)}


async def _beside(database: Database, snap: Snapshot, scope: set[str], racks: set[str]) -> tuple[Any, Any]:
    """The shards outside `scope` on `racks` as a commit now would take them from `snap` (None:
    it cannot say) and as stored."""
    async with database.unit_of_work() as uow:
        committed = await _read_committed(uow.session, scope)
        generation = committed.generation
        since = None if generation == snap.generation else await _specs_since(uow.session, snap, generation)
        return (_snapshot_neighbours(snap, committed, racks, since),
                await _neighbours(uow.session, committed, racks))


@pytest.mark.parametrize("seed", range(8))
async def test_the_shards_beside_a_scope_from_a_snapshot_current_or_stale_by_deletions_are_those_stored(
        database: Database, seed: int) -> None:
    rng = random.Random(seed)
    doc = _cluster(rng, deployments=12)
    slots = rng.sample([(node, index) for node in NODES for index in range(4)], 36)
    doc["placements"] = [{"deployment": d["id"], "replica": replica, "shard": shard, "node": node,
                          "accelerator_indices": [index]}
                         for d in doc["deployments"] for replica in range(d["replicas"])
                         for shard in range(d["shards_per_replica"]) if rng.random() < 0.7 and slots
                         for node, index in (slots.pop(),)]
    snap = await _seeded(database, doc)
    names = sorted(snap.deployment_ids)
    if seed % 2:  # deployments deleted since the snapshot: their shards leave
        gone = rng.sample(names, 3)
        async with database.unit_of_work() as uow:
            for key in gone:
                row = (await uow.session.scalars(select(m.Deployment).where(
                    m.Deployment.name == key.split("/")[1]))).one()
                row.phase = m.DeploymentPhase.DELETING
            await bump_cluster_generation(uow.session, ClusterChange.deployment_deleted(*gone))
            await uow.commit()
    scope = set(rng.sample(names, 2))
    for racks in (set(RACKS), {"r1a"}, {"r1b", "r2a"}):
        from_snapshot, stored = await _beside(database, snap, scope, racks)
        assert from_snapshot == stored, racks
        assert stored[0] or racks != set(RACKS)  # something runs beside the scope


async def test_the_shards_beside_a_scope_of_an_older_revision_from_a_snapshot_are_those_stored(
        database: Database) -> None:
    await _rolled_cluster(database)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    from_snapshot, stored = await _beside(database, snap, {"a/x"}, {"r1b"})
    assert from_snapshot == stored and stored[0] == {("c/old", 0, 0): (1, ("r1b-n0", (0, 1), None))}


async def test_the_snapshot_does_not_say_the_shards_beside_a_scope_placed_since_or_beside_those_it_left_out(
        database: Database) -> None:
    snap = await _quota_cluster(database)
    first = await _commit(database, snap, _one("a/x", "r1a-n1", 0), scope={"a/x"})  # another commit since
    assert not first.stale
    from_snapshot, stored = await _beside(database, snap, {"a/y"}, {"r1a"})
    assert from_snapshot is None and ("a/x", 0, 0) in stored[0]
    async with database.unit_of_work() as uow:
        now = await load_snapshot(uow.session)
    left_out = replace(now, released={("a/x", 0, 0): ("r1a-n1", (0,), None)})
    assert (await _beside(database, left_out, {"a/y"}, {"r1a"}))[0] is None
    assert (await _beside(database, left_out, {"a/y"}, {"r2a"}))[0] == ({}, {})


async def test_a_scoped_commit_onto_accelerators_another_commit_took_since_its_snapshot_is_requeued(
        database: Database) -> None:
    snap = await _quota_cluster(database)
    assert not (await _commit(database, snap, _one("a/x", "r1a-n1", 2), scope={"a/x"})).requeued

    result = await _commit(database, snap, _one("a/y", "r1a-n1", 2), scope={"a/y"})

    assert result.stale and list(result.requeued) == [("a/y", 0)] and result.shards == {}


async def test_a_current_scoped_commit_judges_the_shards_beside_it_by_its_snapshot_without_reading_them(
        database: Database) -> None:
    snap = await _quota_cluster(database)  # a/old holds r1a-n0's accelerators 0 and 1
    for plan, turned_away in ((_one("a/x", "r1a-n0", 1), True), (_one("a/x", "r1a-n0", 2), False)):
        async with database.unit_of_work() as uow:
            with rows_read(uow.session) as counts:
                result = await commit_plan(uow.session, snap, plan, scope={"a/x"}, now=NOW)
        assert not result.stale and bool(result.requeued) == turned_away
        # a/x's row with the generation, early and again under the lock: no placement read, a/old's neither.
        assert sum(counts) == 2, counts


async def test_the_specs_a_scope_is_judged_by_include_its_outgoing_revisions(database: Database) -> None:
    await _rolled_cluster(database)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    outgoing = {sid for sid, ref in snap.solver_refs.items() if ref.key == "c/old" and ref.outgoing}
    assert outgoing  # the running replica of revision 1
    named = {*snap.solver_refs, "c/old", "a/x"}
    assert {sid for sid in named if sid in _solver_ids(snap, {"c/old", "a/x"})} == {"c/old", "a/x"} | outgoing
    assert {sid for sid in named if sid in _solver_ids(snap, {"a/x"})} == {"a/x"}
    assert {d["id"] for d in _spec_doc(snap, {"c/old"})["deployments"]} == {"c/old~1", "c/old~2"}
