"""Preemptions on the warm cluster (controller/scheduling/cache/deciding.py): a fast pass decides
several deployments one after the other on the session and commits them in one plan. A later
decision may preempt what an earlier one of the same pass placed; the plan held those replicas
still, put more on an accelerator, a rack or a row than the session judged, and the commit's
re-check turned the pass away, with the victims of its preemptions evicted all the same (an
exploratory run of rolling updates: "row row-a draws 37600 W, over its budget of 36000 W"). And a
rolling update's replacement, decided after preemptible work waiting since its last preemption,
preempted other running work for the room its retired replica had just freed."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select

from bench.checking import check_state
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import agents, tenants, topology, updates
from controller.usecases.ports import RecordingSignals
from controller.domain.values import NodeInfo, RackSpec, RowSpec, TenantSpec, TopologySpec, ZoneSpec
from test_reconcile_fast import assert_same, fresh, reconciler
from uc_builders import WHO, deployment, run_all, submit


async def _events(db: Database, after: int = 0) -> list[tuple[int, str, str, dict]]:
    """Deployment events after id `after`: (id, kind, deployment, data)."""
    async with db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(m.Event.id, m.Event.kind, m.Event.object_id, m.Event.data)
                                          .where(m.Event.id > after).order_by(m.Event.id))).all()
    return [tuple(r) for r in rows if r[1].startswith("deployment.")]


async def test_what_a_later_decision_of_the_pass_preempts_is_not_placed_by_the_plan(cluster) -> None:
    # 16 accelerators (`cluster`: two racks of two 4-accelerator nodes); 12 filled by `base`.
    loop = reconciler(cluster)
    await submit(cluster, deployment("base", replicas=12, locality="node", priority=3, preemptible=True))
    await loop.reconcile_once()
    await run_all(cluster)
    seen = max(e[0] for e in await _events(cluster))
    # Two arrivals, one pass: `burst` takes the 4 free accelerators, then `big` (rack-local)
    # preempts the cheapest work of a rack for them: `burst`'s, placed by the same pass.
    await submit(cluster, deployment("burst", replicas=4, locality="node", priority=1, preemptible=True))
    await submit(cluster, deployment("big", shards=4, locality="rack", priority=10))
    full, fast = loop.full_passes, loop.fast_passes
    outcome = await loop.reconcile_once()
    assert outcome.solved and (loop.full_passes, loop.fast_passes) == (full, fast + 1)
    events = await _events(cluster, seen)
    assert not [e for e in events if e[1] == "deployment.requeued"]  # was: ACCELERATOR ... shared with others
    assert not [e for e in events if e[1] == "deployment.preempted"]  # nothing that ran stopped
    snapshot = await fresh(cluster)
    held = {}
    for p in snapshot.problem["placements"]:
        held[p["deployment"]] = held.get(p["deployment"], 0) + 1
    assert held == {"t1/base": 12, "t1/big": 4}
    assert_same(loop.warm_snapshot, snapshot)  # the cache followed what was written
    assert not check_state(snapshot.problem, snapshot.problem["placements"])


async def _power_bound_cluster(db: Database) -> None:
    """The exploratory run's: one row of 36 kW, two racks of 22 kW, 8 nodes each (4 accelerators,
    600 W idle): 37 shards of 700 W at most."""
    spec = TopologySpec(zones=(ZoneSpec("z1"),), rows=(RowSpec("row-a", "z1", 36000.0),),
                        racks=(RackSpec("rack-00", "row-a", 22000.0), RackSpec("rack-01", "row-a", 22000.0)))
    async with db.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, spec, RecordingSignals())
    for rack in ("rack-00", "rack-01"):
        for i in range(8):
            info = NodeInfo(node_id=f"{rack}-n{i:02d}", rack=rack, accelerators=4, accelerator_model="maia-100",
                            hbm_gib=64.0, idle_power_w=600.0)
            async with db.unit_of_work() as uow:
                reg = await agents.register_node(uow, WHO, info, heartbeat_interval_ms=1000)
            async with db.unit_of_work() as uow:
                await agents.hello(uow, WHO, reg.node_id, reg.session_id, datetime.now(timezone.utc))
    for tenant in (TenantSpec(id="g"), TenantSpec(id="a", reserved_accelerators=8)):
        async with db.unit_of_work() as uow:
            await tenants.create_tenant(uow, WHO, tenant, RecordingSignals())


def _gang(hbm_gib: float):
    return deployment("gang", tenant="a", replicas=2, shards=8, shard_hbm_gib=hbm_gib, shard_power_w=700.0,
                      locality="rack", priority=100)


async def _update(db: Database, hbm_gib: float) -> None:
    async with db.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "a", "gang")
        await updates.update_deployment(uow, WHO, _gang(hbm_gib), row.resource_version, RecordingSignals())


async def test_rolling_updates_among_preemptible_work_under_a_row_budget(database: Database) -> None:
    await _power_bound_cluster(database)
    loop = reconciler(database)
    await submit(database, deployment("scav", tenant="g", replicas=40, shard_power_w=700.0, locality="node",
                                      priority=5, preemptible=True))
    await loop.reconcile_once()
    await run_all(database)
    await submit(database, _gang(48.0))
    for _ in range(3):
        await loop.reconcile_once()
    await run_all(database)
    await _update(database, 50.0)  # rolls: a replacement beside the old replicas (it preempts for that)
    await loop.reconcile_once()
    await loop.reconcile_once()
    await run_all(database)
    seen = max(e[0] for e in await _events(database))
    # The replacement runs: old replica 0 retires, freeing 8 accelerators and 5.6 kW; the next
    # replacement takes that room. It took 16 restarts: 8 waiting `scav` replicas placed there
    # first, and 8 running ones preempted for the replacement.
    await loop.reconcile_once()
    events = await _events(database, seen)
    assert [e[1] for e in events][:2] == ["deployment.replica_retired", "deployment.placed"]
    assert not [e for e in events if e[1] in ("deployment.preempted", "deployment.requeued")]
    seen = max(e[0] for e in events)
    # Updated again before that replacement runs, and again after: every pass lands what it decided.
    hbm = 50.0
    for step in ("update", "pass", "pass", "update", "pass", "run", "pass", "pass", "run", "update", "pass", "pass",
                 "run", "pass", "update", "run", "pass", "pass", "run", "pass"):
        if step == "update":
            hbm = 48.0 if hbm == 50.0 else 50.0
            await _update(database, hbm)
        elif step == "run":
            await run_all(database)
        else:
            await loop.reconcile_once()
    events = await _events(database, seen)
    assert not [e for e in events if e[1] == "deployment.requeued"]
    snapshot = await fresh(database)
    assert not check_state(snapshot.problem, snapshot.problem["placements"])
