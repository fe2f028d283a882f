"""Deployment use cases: validation with exact messages, nothing written on error, dry run."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
from sqlalchemy import text

from controller.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from controller.identity import Principal, Role
from controller.ratelimit import KeyedRateLimiter, SubmitLimits
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store import rollout
from controller.store.db import UnitOfWork
from controller.usecases import deployments, planning, updates
from controller.domain.values import DeploymentSpec, Spread
from controller.usecases.ports import RecordingSignals
from controller.usecases import capacity as capacity_module
from controller.usecases.capacity import CapacityCache, CapacityRefresher
from controller.usecases.reservations import OwedCapacity, owed_capacity
from uc_builders import (
    WHO, add_nodes, add_tenant, apply_topology, assert_refused_writing_nothing, deployment, no_publish, row_counts,
    run_all, submit, with_shard,
)

GOOD = deployment("svc", "t1", replicas=2, shards=2, accelerators=1)
TENANT = Principal("lab", role=Role.TENANT, tenant="t1")


async def test_submit_stores_pending_and_wakes(cluster):
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        view = await deployments.submit_deployment(uow, WHO, GOOD, signals)
    assert view.phase == "pending" and view.placements == ()
    assert signals.wakes == 1 and [e.type for e in signals.events] == ["added"]
    async with cluster.unit_of_work() as uow:
        got = await deployments.get_deployment(uow, WHO, "svc")
        listed = (await deployments.list_deployments(uow, WHO, "t1")).items
        other = (await deployments.list_deployments(uow, WHO, "t2")).items
    assert got.spec == GOOD
    assert [d.spec.name for d in listed] == ["svc"] and other == ()


BAD = [
    (replace(GOOD, name="Bad_Name"), InvalidArgument, "deployment name 'Bad_Name' is invalid"),
    (replace(GOOD, name="x" * 64), InvalidArgument, "is 64 characters long; at most 63"),
    (replace(GOOD, replicas=0), InvalidArgument, "deployment svc: replicas must be between 1 and 4096, got 0"),
    (replace(GOOD, min_replicas=3), InvalidArgument,
     "deployment svc: min_replicas must be between 1 and replicas (2), got 3"),
    (replace(GOOD, shards_per_replica=0), InvalidArgument, "deployment svc: shards_per_replica must be between 1 and 256, got 0"),
    (with_shard(GOOD, accelerator_milli=1500), InvalidArgument,
     "shard.accelerator_milli must be between 1 and 1000, got 1500"),
    (with_shard(GOOD, accelerators=2, accelerator_milli=500), InvalidArgument,
     "shard.accelerator_milli 500 (a fraction) needs shard.accelerators = 1, got 2"),
    (with_shard(GOOD, hbm_gib=-1.0), InvalidArgument, "deployment svc: shard.hbm_gib must be >= 0, got -1"),
    (with_shard(GOOD, power_w=-5.0), InvalidArgument, "deployment svc: shard.power_w must be >= 0, got -5"),
    (replace(GOOD, locality="galaxy"), InvalidArgument, "locality 'galaxy' is not one of node, rack, row, zone, none"),
    (replace(GOOD, spread=Spread("rack", 0)), InvalidArgument, "spread.max_per_domain must be between 1 and 4096, got 0"),
    (replace(GOOD, tenant="ghost"), NotFound, "tenant ghost not found"),
    # Impossible on this cluster, with the numbers:
    (deployment("big", "t1", shards=3, accelerators=4), InvalidArgument,
     "deployment big: one rack-local replica needs 12 accelerators (3 shards x 4); the largest rack holds 8 (rack-a)"),
    (deployment("fat", "t1", accelerators=8, locality="none"), InvalidArgument,
     "deployment fat: one shard needs 8 accelerators on one node; the largest node has 4"),
    (deployment("alien", "t1", shard_accelerator_models=("tpu-v9",)), InvalidArgument,
     "deployment alien: no node has accelerator model tpu-v9 (registered models: maia-100)"),
    (deployment("hbm", "t1", shard_hbm_gib=128.0), InvalidArgument,
     "one shard needs 128 GiB of HBM per accelerator; the most any node has is 64 GiB"),
    (deployment("nodey", "t1", shards=5, accelerators=1, locality="node"), InvalidArgument,
     "one node-local replica needs 5 accelerators (5 shards x 1); the largest node holds 4"),
    (deployment("apart", "t1", replicas=3, min_replicas=2, spread=Spread("zone", 1)), InvalidArgument,
     "deployment apart: min_replicas 2 at most 1 a zone takes 2 zones; the cluster has 1 with the accelerators asked"),
    (deployment("pernode", "t1", replicas=12, min_replicas=9, spread=Spread("node", 2)), InvalidArgument,
     "deployment pernode: min_replicas 9 at most 2 a node takes 5 nodes; the cluster has 4"),
]


@pytest.mark.parametrize("cached", [False, True], ids=["fresh read", "capacity cache"])
@pytest.mark.parametrize(("spec", "error", "message"), BAD, ids=[b[2][:40] for b in BAD])
async def test_bad_deployment_is_refused_and_nothing_written(shared_cluster, spec, error, message, cached):
    signals = RecordingSignals()
    capacity = CapacityCache() if cached else None
    await assert_refused_writing_nothing(
        shared_cluster, lambda uow: deployments.submit_deployment(uow, WHO, spec, signals, capacity=capacity),
        error, message)
    assert signals.wakes == 0 and signals.events == []


async def test_the_capacity_cache_follows_node_changes(cluster):
    """Judged from the cache, a submission sees nodes registered (and racks moved) after the
    cache was filled: a change of capacity bumps the cluster generation the cache is kept by."""
    capacity = CapacityCache()
    tpu = deployment("tpu", "t1", shard_accelerator_models=("tpu-v9",))
    async with cluster.unit_of_work() as uow:
        with pytest.raises(InvalidArgument, match="no node has accelerator model tpu-v9"):
            await deployments.submit_deployment(uow, WHO, tpu, RecordingSignals(), capacity=capacity)
    await apply_topology(cluster, {"rack-a": "row-a", "rack-b": "row-a", "rack-c": "row-b"})
    await add_nodes(cluster, "rack-c", 3, model="tpu-v9")
    wide = deployment("wide", "t1", shards=12, accelerators=1, shard_accelerator_models=("tpu-v9",))
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, tpu, RecordingSignals(), capacity=capacity)
        await deployments.submit_deployment(uow, WHO, wide, RecordingSignals(), capacity=capacity)
    # Two models in one rack add up: maia-100 and tpu-v9 nodes both in rack-a now.
    await add_nodes(cluster, "rack-a", 1, model="tpu-v9", prefix="rack-a-tpu")
    both = deployment("both", "t1", shards=12, accelerators=1, shard_accelerator_models=("maia-100", "tpu-v9"))
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, both, RecordingSignals(), capacity=capacity)
        with pytest.raises(InvalidArgument, match=r"the largest rack holds 12 \(rack-a\)"):
            await deployments.submit_deployment(uow, WHO, replace(both, name="more", shards_per_replica=13),
                                                RecordingSignals(), capacity=capacity)


async def test_a_shard_no_rack_could_ever_power_is_refused_and_a_budget_raised_lets_it_in(cluster):
    """It was taken and waited Pending with POWER_RACK for ever. Each node draws 500 W idle; a rack
    of 2,500 W leaves one node 2,000 W with its neighbours down (the most any state gives it). The
    capacity cache follows the budget (0036: a budget change moves the capacity generation)."""
    capacity = CapacityCache()
    await apply_topology(cluster, rack_budget_w=2500.0)
    hot = deployment("hot", "t1", accelerators=2, shard_power_w=1100.0, locality="none")  # 2,200 W a shard
    for cache in (None, capacity):
        async with cluster.unit_of_work() as uow:
            with pytest.raises(InvalidArgument) as refused:
                await deployments.submit_deployment(uow, WHO, hot, RecordingSignals(), capacity=cache)
        assert refused.value.message == (
            "deployment hot: one shard draws 2200 W; the most any node could give it is 2000 W "
            "(rack-a-n0: rack rack-a's budget 2500 W less the node's own idle 500 W)")
        assert [(r.code, r.scope) for r in refused.value.reasons] == [("POWER_RACK", "rack-a")]
    async with cluster.unit_of_work() as uow:  # what fits at the line is taken
        await deployments.submit_deployment(uow, WHO, replace(with_shard(hot, power_w=1000.0), name="warm"),
                                            RecordingSignals(), capacity=capacity)
        await uow.commit()
    await apply_topology(cluster, rack_budget_w=3000.0)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, hot, RecordingSignals(), capacity=capacity)
        await uow.commit()
    assert capacity.rebuilds == 2


@pytest.mark.parametrize(("budget", "power_w"), [
    (400.0, 0.0),         # its node idles (500 W) above its rack's budget: "room" below 0, the shard draws nothing
    (900.3, 200.15),      # 900.3 - 500 is 400.29999999999995 W left, 400.3 W a shard (2 x 200.15): float noise
])
async def test_what_the_solver_would_place_is_never_refused_for_power(cluster, budget, power_w):
    """The judgement is the solver's (`power_slots`: a shard of no power is never held back, a
    budget is met within POWER_SLACK_W): a 0 W shard was refused where a node idles above its
    rack's budget (Register takes one), and one at the line refused in float noise."""
    await apply_topology(cluster, {"rack-a": "row-a", "rack-b": "row-a", "rack-c": "row-b"}, budgets={"rack-c": budget})
    await add_nodes(cluster, "rack-c", 1, model="tpu-v9")
    spec = deployment("edge", "t1", accelerators=2, shard_power_w=power_w, locality="none",
                      shard_accelerator_models=("tpu-v9",))
    for i, cache in enumerate((None, CapacityCache())):
        async with cluster.unit_of_work() as uow:
            await deployments.submit_deployment(uow, WHO, replace(spec, name=f"edge-{i}"), RecordingSignals(),
                                                capacity=cache)


async def test_the_capacity_refresher_builds_the_index_before_a_submit_needs_it(cluster):
    """Once the stored capacity generation has held still for a poll (read twice), the refresher
    rebuilds the index, so the next submit judges from it without a rebuild of its own; while
    nodes keep changing (a join) it waits for them to settle."""
    capacity = CapacityCache()
    refresher = CapacityRefresher(cluster, capacity)
    assert not await refresher.poll_once()  # the first read: not known to be settled
    assert await refresher.poll_once() and capacity.rebuilds == 1
    assert not await refresher.poll_once() and capacity.rebuilds == 1  # nothing moved
    for i in range(2):  # moved at each poll: still moving
        await add_nodes(cluster, "rack-b", 1, prefix=f"rack-b-new{i}")
        assert not await refresher.poll_once()
    assert await refresher.poll_once() and capacity.rebuilds == 2
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals(), capacity=capacity)
        await uow.commit()
    assert capacity.rebuilds == 2  # the submit found the index at the stored generation


async def test_the_capacity_cache_outlives_placement_commits(cluster):
    """Rebuilt when what the cluster could hold changes (a node's accelerators, a rack's row, a
    new node: database triggers), not when placements are committed (the cluster generation)."""
    capacity = CapacityCache()

    async def judged() -> int:
        async with cluster.unit_of_work() as uow:
            await capacity.index(uow)
        return capacity.rebuilds

    async def write(statement: str) -> None:
        async with cluster.unit_of_work() as uow:
            await uow.session.execute(text(statement))
            await uow.commit()

    first = await judged()
    async with cluster.unit_of_work() as uow:
        await repo.bump_cluster_generation(uow.session)  # what a plan commit does
        await uow.commit()
    await write("UPDATE nodes SET power_draw_w = 123 WHERE rack_id = 'rack-a'")  # a heartbeat
    assert await judged() == first
    await write("UPDATE nodes SET accelerators = 2 WHERE id = (SELECT min(id) FROM nodes)")
    assert await judged() == first + 1
    await apply_topology(cluster, {"rack-a": "row-b", "rack-b": "row-a"})
    assert await judged() == first + 2
    await add_nodes(cluster, "rack-b", 1, prefix="rack-b-new")
    assert await judged() == first + 3


async def test_fractional_gang_counts_shared_accelerators(cluster):
    # 10 shards of 500 milli share 5 accelerators: fits a 4+4 rack, not one 4-accelerator node.
    spec = deployment("frac", "t1", shards=10, accelerators=1, shard_accelerator_milli=500)
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, spec, RecordingSignals())
    with pytest.raises(InvalidArgument, match=r"needs 5 accelerators \(10 shards x 500 milli\); the largest node holds 4"):
        async with cluster.unit_of_work() as uow:
            await deployments.submit_deployment(uow, WHO, replace(spec, name="frac2", locality="node"),
                                                RecordingSignals())


async def test_duplicate_name_already_exists(cluster):
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals())
    await assert_refused_writing_nothing(
        cluster, lambda uow: deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals()),
        AlreadyExists, "deployment svc already exists")


async def test_dry_run_places_on_concrete_accelerators_and_writes_nothing(cluster):
    before = await row_counts(cluster)
    view = await deployments.dry_run_deployment(cluster, WHO, GOOD, time_limit_ms=2000)
    assert view.phase == "scheduled" and view.placed_replicas == 2
    assert len(view.placements) == 4
    slots = {(p.node, i) for p in view.placements for i in p.accelerator_indices}
    assert len(slots) == 4  # four distinct accelerators
    async with cluster.unit_of_work() as uow:
        racks = {n.id: n.rack_id for n in await repo.list_node_rows(uow.session)}
    assert set(racks.values()) == {"rack-a", "rack-b"}
    for p in view.placements:
        assert p.rack == racks[p.node] and p.accelerator_indices
    assert await row_counts(cluster) == before


async def test_a_dry_run_of_a_running_deployment_as_it_is_keeps_what_it_holds(cluster):
    """Re-applying a running deployment as it is (`maiactl apply`'s dry run, `explain`) was solved
    with its replicas released first: pending work took what they held, and the answer was
    "would place 0/2" for two replicas that go on running."""
    serve = deployment("serve", "t1", replicas=2, accelerators=4, locality="node")
    await submit(cluster, serve)
    await submit(cluster, deployment("filler", "t1", replicas=1, accelerators=4, locality="node"))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    await submit(cluster, deployment("wants", "t1", replicas=2, min_replicas=2, accelerators=4, locality="node",
                                     priority=5))  # 4 of 16 accelerators free: it waits
    for spec, placed in ((serve, 2), (replace(serve, replicas=1), 1), (replace(serve, priority=1), 2)):
        view = await deployments.dry_run_deployment(cluster, WHO, spec, time_limit_ms=2000, replace_existing=True)
        assert view.placed_replicas == placed, (spec, view.reasons)


async def test_a_cancelled_dry_run_holds_its_slot_until_its_solve_ends(cluster, monkeypatch):
    """gRPC cancels a call whose client went or whose deadline passed; its solve runs on in a
    worker thread. The slot was freed at once: a tenant with short deadlines ran as many solves
    at once as it liked (6 with --dry-run-slots 1; found in review)."""
    entered, release = threading.Event(), threading.Event()
    solve = planning._solve_sync

    def held_solve(problem, time_limit_ms):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return solve(problem, time_limit_ms)

    monkeypatch.setattr(planning, "_solve_sync", held_solve)
    limits = SubmitLimits(KeyedRateLimiter(0, "submits"), KeyedRateLimiter(30, "dry runs"), dry_run_slots=1)
    call = asyncio.create_task(deployments.dry_run_deployment(cluster, TENANT, GOOD, time_limit_ms=2000,
                                                              throttle=limits))
    assert await asyncio.to_thread(entered.wait, 30)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    with pytest.raises(ResourceExhausted, match="1 dry run\\(s\\) are being solved now"):
        limits.start_dry_run("t1")  # the solve goes on: its slot too
    release.set()
    for _ in range(3000):
        try:
            limits.start_dry_run("t1")
            break
        except ResourceExhausted:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the slot was never freed after the solve ended")
    limits.end_dry_run()


def test_a_dry_run_refused_for_want_of_a_slot_spends_none_of_the_tenants_rate():
    """A tenant kept out by others' dry runs, trying again as told, spent its whole minute on
    refusals and was then refused for its rate (found in review)."""
    limits = SubmitLimits(KeyedRateLimiter(0, "submits"), KeyedRateLimiter(2, "dry runs"), dry_run_slots=1)
    limits.start_dry_run("other")
    for _ in range(5):
        with pytest.raises(ResourceExhausted, match="being solved now"):
            limits.start_dry_run("t1")
    limits.end_dry_run()
    for _ in range(2):  # its two a minute, untouched
        limits.start_dry_run("t1")
        limits.end_dry_run()
    with pytest.raises(ResourceExhausted, match="tenant t1 exceeded 2 dry runs a minute"):
        limits.start_dry_run("t1")


async def test_dry_run_of_unplaceable_says_why(cluster):
    # Fits a rack in principle (8 accelerators), but 3 replicas of a rack-local 8-accelerator gang
    # cannot all be placed on 2 racks.
    spec = deployment("wide", "t1", replicas=3, min_replicas=3, shards=2, accelerators=4)
    view = await deployments.dry_run_deployment(cluster, WHO, spec, time_limit_ms=2000)
    assert view.phase == "pending" and view.placements == ()
    assert view.reasons and all(r.code and r.message for r in view.reasons)


async def test_delete_marks_deleting(cluster):
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals())
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        view = await deployments.delete_deployment(uow, WHO, "svc", signals)
    assert view.phase == "deleting" and signals.wakes == 1
    with pytest.raises(NotFound, match="deployment nope not found"):
        async with cluster.unit_of_work() as uow:
            await deployments.delete_deployment(uow, WHO, "nope", RecordingSignals())


async def test_a_request_id_outlives_its_deleted_deployment_for_the_retention(cluster):
    from datetime import timedelta

    from sqlalchemy import delete, select, update

    from controller.errors import FailedPrecondition
    from controller.store import models as m

    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals(), request_id="r1")
    async with cluster.unit_of_work() as uow:  # deleted and released (what the reconciler does)
        await deployments.delete_deployment(uow, WHO, "svc", RecordingSignals())
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "svc"))
        await uow.commit()
    # The submit retried after the delete is not applied a second time.
    with pytest.raises(FailedPrecondition, match="'r1' was already used by tenant t1 to submit deployment svc, "
                                                 "which has been deleted since; use a new id"):
        async with cluster.unit_of_work() as uow:
            await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals(), request_id="r1")
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.scalars(select(m.Deployment.name))).all() == []
        # Past the retention it is forgotten: the tenant's next request id recorded drops it...
        await uow.session.execute(update(m.ClientRequest).values(created_at=m.utcnow() - timedelta(days=2)))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, replace(GOOD, name="other"), RecordingSignals(), request_id="r2")
    async with cluster.unit_of_work() as uow:
        assert (await uow.session.scalars(select(m.ClientRequest.request_id))).all() == ["r2"]
        await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals(), request_id="r1")
    # ... and the id itself, sent again, is a new request (it was refused until another id was recorded).
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "svc", RecordingSignals())
        await uow.session.execute(delete(m.Deployment).where(m.Deployment.name == "svc"))
        await uow.session.execute(update(m.ClientRequest).where(m.ClientRequest.request_id == "r1")
                                  .values(created_at=m.utcnow() - timedelta(days=2)))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        view = await deployments.submit_deployment(uow, WHO, GOOD, RecordingSignals(), request_id="r1")
    async with cluster.unit_of_work() as uow:
        seen = await uow.session.get(m.ClientRequest, ("t1", "r1"))
        assert seen is not None and seen.deployment_id is not None and view.spec.name == "svc"


async def test_the_capacity_index_is_built_off_the_event_loop(cluster, monkeypatch):
    """A rebuild's pass over every node runs in a worker thread, so the event loop keeps serving
    while it builds (at 16,384 nodes one step of ~40 ms otherwise: usecases/capacity.py)."""
    built_on: list[int] = []
    build = capacity_module.CapacityIndex.__init__

    def recording(self, nodes):  # type: ignore[no-untyped-def]
        built_on.append(threading.get_ident())
        build(self, nodes)

    capacity = CapacityCache()  # (holds an empty index, made here)
    monkeypatch.setattr(capacity_module.CapacityIndex, "__init__", recording)
    async with cluster.unit_of_work() as uow:
        index = await capacity.index(uow)
    assert capacity.rebuilds == 1 and not index.empty()
    assert built_on and threading.get_ident() not in built_on


async def test_a_rebuild_given_up_while_its_thread_builds_leaves_the_index_to_the_next(cluster, monkeypatch):
    """A submit that goes away (its deadline) while the index is built in the worker thread leaves
    the cache as it was (no index taken for a generation it was not built at, the lock free); the
    next call rebuilds it."""
    entered, release = threading.Event(), threading.Event()
    build = capacity_module._index_of

    def held(rows):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)
        return build(rows)

    capacity = CapacityCache()
    monkeypatch.setattr(capacity_module, "_index_of", held)
    async with cluster.unit_of_work() as uow:
        gone = asyncio.ensure_future(capacity.index(uow))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        release.set()
    assert capacity.rebuilds == 0 and capacity._index.empty()
    monkeypatch.setattr(capacity_module, "_index_of", build)
    async with cluster.unit_of_work() as uow:
        index = await asyncio.wait_for(capacity.index(uow), 5)
    assert capacity.rebuilds == 1 and index.models() == ["maia-100"]


def _two_past_the_version_check(monkeypatch) -> None:  # noqa: ANN001
    """Two updates run on only once both passed the check of their resource version (neither wrote)."""
    checked, both = [], asyncio.Event()
    contract = updates.check_contract

    async def both_past_the_version_check(*args, **kw):  # noqa: ANN002, ANN003
        checked.append(1)
        if len(checked) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 10)
        return await contract(*args, **kw)

    monkeypatch.setattr(updates, "check_contract", both_past_the_version_check)


async def test_two_updates_from_one_resource_version_land_one_and_refuse_the_other(cluster, monkeypatch):
    """Both read version 1 and pass its check before either writes (two applies at once): both
    were answered OK, the second writing over the first (found by exploratory testing)."""
    await submit(cluster, deployment("svc", replicas=1))
    _two_past_the_version_check(monkeypatch)

    async def update(replicas: int) -> None:
        async with cluster.unit_of_work() as uow:
            await updates.update_deployment(uow, WHO, deployment("svc", replicas=replicas), 1, RecordingSignals())

    outcomes = await asyncio.gather(update(2), update(3), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "NoneType"], outcomes
    won = 2 if outcomes[0] is None else 3
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert (row.replicas, row.resource_version) == (won, 2)
    assert "another update landed meanwhile" in next(o for o in outcomes if o is not None).message


def _meanwhile(monkeypatch: pytest.MonkeyPatch, between) -> None:  # noqa: ANN001
    """`between()` runs once, after the update read the deployment and before it writes."""
    contract = updates.check_contract
    ran: list[bool] = []

    async def then_check(*args, **kw):  # noqa: ANN002, ANN003
        if not ran:
            ran.append(True)
            await between()
        return await contract(*args, **kw)

    monkeypatch.setattr(updates, "check_contract", then_check)


async def test_an_update_writes_over_what_landed_since_its_read_only_its_own_change(cluster, monkeypatch):
    """Between the update's read and its write a pass placed the replicas (revision 1) and a
    failure count was stored: the update wrote its older copy back (revision 1's spec dropped,
    so the next pass stopped both running replicas before any replacement; the failures kept)."""
    await submit(cluster, deployment("svc", replicas=2, accelerators=2, spread=None))

    async def placed_and_failing() -> None:
        await Reconciler(cluster, push=lambda ids: None, publish=no_publish).reconcile_once()
        async with cluster.unit_of_work() as uow:
            await uow.session.execute(text("UPDATE deployments SET failures = 3 WHERE name = 'svc'"))
            await uow.commit()

    _meanwhile(monkeypatch, placed_and_failing)
    async with cluster.unit_of_work() as uow:  # a rolling change: one accelerator a shard
        await updates.update_deployment(uow, WHO, deployment("svc", replicas=2, accelerators=1, spread=None), 1,
                                        RecordingSignals())
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert {p.revision for p in row.placements} == {1} and len(row.placements) == 2
        assert (row.template_revision, sorted(row.revision_specs), row.failures) == (2, ["1"], 0)


@pytest.mark.parametrize("rolling", [False, True])
async def test_an_update_of_a_deployment_marked_for_deletion_meanwhile_is_refused(cluster, monkeypatch, rolling):
    """A deletion landing between the update's read and its write leaves the resource version
    as it was: the update was answered OK on a deployment being deleted, its event after the
    deletion's, where one landing after the deletion is FAILED_PRECONDITION."""
    v1 = deployment("svc", replicas=2, accelerators=1, spread=None)
    await submit(cluster, v1)
    _meanwhile(monkeypatch, lambda: deployments.delete_deployment_alone(cluster, WHO, "svc", RecordingSignals(),
                                                                        tenant="t1"))
    changed = with_shard(v1, accelerators=2) if rolling else replace(v1, replicas=3)
    with pytest.raises(FailedPrecondition, match="deployment svc is being deleted"):
        async with cluster.unit_of_work() as uow:
            await updates.update_deployment(uow, WHO, changed, 1, RecordingSignals())
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert (row.phase, row.replicas, row.template_revision, row.resource_version) == \
            (m.DeploymentPhase.DELETING, 2, 1, 1)


async def test_an_update_of_a_deployment_removed_meanwhile_is_not_found(cluster, monkeypatch):
    """Not ABORTED 'another update landed meanwhile', which sends a client to read it again."""
    await submit(cluster, deployment("svc", replicas=2, accelerators=1, spread=None))

    async def deleted_and_removed() -> None:
        await deployments.delete_deployment_alone(cluster, WHO, "svc", RecordingSignals(), tenant="t1")
        await Reconciler(cluster, push=lambda ids: None, publish=no_publish).reconcile_once()

    _meanwhile(monkeypatch, deleted_and_removed)
    with pytest.raises(NotFound, match="deployment svc not found"):
        async with cluster.unit_of_work() as uow:
            await updates.update_deployment(uow, WHO, deployment("svc", replicas=3, accelerators=1, spread=None), 1,
                                            RecordingSignals())


async def test_an_update_answers_and_publishes_the_placements_committed_meanwhile(cluster, monkeypatch):
    """The view answered and published was built from the placements as first read: none, for
    replicas placed and running meanwhile, and no pass published anything after a change that
    moves nothing (a priority), so a watcher waiting for its rollout waited for good."""
    v1 = deployment("svc", replicas=2, accelerators=1, spread=None)
    await submit(cluster, v1)

    async def placed_and_running() -> None:
        await Reconciler(cluster, push=lambda ids: None, publish=no_publish).reconcile_once()
        await run_all(cluster)

    _meanwhile(monkeypatch, placed_and_running)
    signals = RecordingSignals()
    async with cluster.unit_of_work() as uow:
        done = await updates.update_deployment(uow, WHO, replace(v1, priority=5), 1, signals)
    [event] = signals.events
    assert (done.deployment.running_replicas, len(done.deployment.placements)) == (2, 2)
    assert event.deployment == done.deployment


async def test_a_retry_sent_while_its_first_call_runs_is_answered_as_the_first(cluster, monkeypatch):
    await submit(cluster, deployment("svc", replicas=1))
    _two_past_the_version_check(monkeypatch)

    async def update() -> tuple[int, int]:
        async with cluster.unit_of_work() as uow:
            done = await updates.update_deployment(uow, WHO, deployment("svc", replicas=2), 1, RecordingSignals(),
                                                   request_id="req-7")
            return done.deployment.resource_version, done.deployment.spec.replicas

    assert await asyncio.gather(update(), update()) == [(2, 2), (2, 2)]
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert (row.replicas, row.resource_version) == (2, 2)


async def _shards(cluster) -> dict[tuple[int, int], tuple[int, str, int]]:  # noqa: ANN001
    """(replica, shard) -> (placement id, node, revision) of svc."""
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        return {(p.replica, p.shard): (p.id, p.node_id, p.revision) for p in row.placements}


async def test_a_rollback_to_the_spec_old_replicas_run_keeps_them_as_the_new_revision(cluster):
    """Reverting a rollout midway to the spec the old replicas still run made a third revision
    and replaced every old replica with one alike (each restarted, and room for the surge
    needed: a rollout stalled for room could not be reverted either). The old replicas become
    the new revision's as they run, as a Kubernetes rollback makes the old ReplicaSet the new
    one; the replica of the abandoned revision is retired."""
    loop = Reconciler(cluster, push=lambda ids: None, publish=no_publish)
    v1 = deployment("svc", replicas=2, accelerators=1, spread=None)
    await submit(cluster, v1)
    await loop.reconcile_once()
    await run_all(cluster)
    first = await _shards(cluster)
    assert {revision for _, _, revision in first.values()} == {1} and len(first) == 2
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, with_shard(v1, accelerators=2), row.resource_version,
                                        RecordingSignals())
    await loop.reconcile_once(force=True)  # one replacement (the surge) beside the old two
    await run_all(cluster)
    rolling = await _shards(cluster)
    assert sorted(revision for _, _, revision in rolling.values()) == [1, 1, 2]
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        version = row.resource_version
        dry = await updates.update_deployment(uow, WHO, v1, version, RecordingSignals(), dry_run=True)
    assert (dry.deployment.revision, dry.deployment.updated_replicas, dry.deployment.outgoing_replicas) == (3, 2, 1)
    async with cluster.unit_of_work() as uow:
        done = await updates.update_deployment(uow, WHO, v1, version, RecordingSignals())
    assert (done.deployment.revision, done.deployment.updated_replicas, done.deployment.outgoing_replicas) == (3, 2, 1)
    assert dry.changes == done.changes == ("shard.accelerators: 2 -> 1",
                                           "revision 1's replicas run this spec: they are revision 3's, not replaced")
    for _ in range(3):
        await loop.reconcile_once(force=True)
        await run_all(cluster)
    assert await _shards(cluster) == {key: (pid, node, 3) for key, (pid, node, _) in first.items()}
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert (row.template_revision, row.revision_specs) == (3, {})
        [event] = [e for e in await repo.list_events(uow.session, object_id="t1/svc")
                   if e.kind == "deployment.updated" and "not replaced" in e.message]
    assert "revision 1's replicas run this spec: they are revision 3's" in event.message


async def _rolling_with_its_surge_running(cluster) -> tuple[Reconciler, DeploymentSpec]:  # noqa: ANN001
    """svc (2 replicas, revision 1 running) rolled to 2 accelerators a shard: its surge replica
    placed and running beside the old two, one of which the next retirement may stop."""
    loop = Reconciler(cluster, push=lambda ids: None, publish=no_publish)
    v1 = deployment("svc", replicas=2, accelerators=1, spread=None)
    await submit(cluster, v1)
    await loop.reconcile_once()
    await run_all(cluster)
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, with_shard(v1, accelerators=2), row.resource_version,
                                        RecordingSignals())
    await loop.reconcile_once(force=True)
    await run_all(cluster)
    assert sorted(revision for _, _, revision in (await _shards(cluster)).values()) == [1, 1, 2]
    return loop, v1


@pytest.mark.parametrize("shard_accelerators", [1, 3], ids=["rollback", "another-rollout"])
async def test_retiring_replicas_writes_nothing_over_an_update_that_landed_since_its_read(cluster, monkeypatch,
                                                                                          shard_accelerators: int):
    """`retire_replaced` read the deployments and placements without a lock and wrote its copy
    back: an update landing between its read and its write was written over. A rollback had made
    the old replicas current, and one of them was stopped as old ("revision 1 replaced by 2");
    another rollout's new revision lost its spec, and the next pass stopped its replicas (found
    by review). It now writes only what no update changed since; the next pass judges again."""
    loop, v1 = await _rolling_with_its_surge_running(cluster)
    read_between = rollout._placed_again

    async def update_landing_meanwhile(*args, **kw):  # noqa: ANN002, ANN003
        async with cluster.unit_of_work() as uow:
            row = await repo.get_deployment(uow.session, "t1", "svc")
            await updates.update_deployment(uow, WHO, with_shard(v1, accelerators=shard_accelerators),
                                            row.resource_version, RecordingSignals())
        return await read_between(*args, **kw)

    monkeypatch.setattr(rollout, "_placed_again", update_landing_meanwhile)
    async with cluster.unit_of_work() as uow:
        retired = await rollout.retire_replaced(uow.session, now=m.utcnow())
        await uow.commit()
    assert retired.lines == () and retired.replacing and retired.locked
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        revisions = sorted(p.revision for p in row.placements)
        specs = sorted(row.revision_specs)
    if shard_accelerators == 1:  # the old replicas adopted as revision 3, revision 2's kept
        assert (revisions, specs) == ([2, 3, 3], ["2"])
    else:  # every replica still there, each revision's spec kept
        assert (revisions, specs) == ([1, 1, 2], ["1", "2"])


async def test_a_pass_whose_retirements_all_gave_way_to_an_update_ends_their_locks_before_it_goes_on(cluster,
                                                                                                   monkeypatch):
    """Every retirement given up (an update landed since its read) left the rows it had locked to
    write (the placements, isolation_state, the generation writers' lock shared) held through the
    rest of the pass: its plan commit then ran holding them, other writers waited for the whole
    pass, and a commit that must take the generation writers' lock exclusive failed (found by
    review). The pass ends that transaction first, and the rollout then goes on."""
    loop, v1 = await _rolling_with_its_surge_running(cluster)
    read_between, landed = rollout._placed_again, []

    async def update_landing_meanwhile(*args, **kw):  # noqa: ANN002, ANN003
        if not landed:
            landed.append(1)
            async with cluster.unit_of_work() as uow:
                row = await repo.get_deployment(uow.session, "t1", "svc")
                await updates.update_deployment(uow, WHO, with_shard(v1, accelerators=3), row.resource_version,
                                                RecordingSignals())
        return await read_between(*args, **kw)

    monkeypatch.setattr(rollout, "_placed_again", update_landing_meanwhile)
    rolled_back: list[int] = []
    real_rollback = UnitOfWork.rollback

    async def rollback(self):  # noqa: ANN001, ANN202
        rolled_back.append(1)
        return await real_rollback(self)

    monkeypatch.setattr(UnitOfWork, "rollback", rollback)
    await loop.reconcile_once(force=True)  # the retirement gives way; the pass goes on
    assert landed and rolled_back
    for _ in range(6):
        await loop.reconcile_once(force=True)
        await run_all(cluster)
    assert sorted(revision for _, _, revision in (await _shards(cluster)).values()) == [3, 3]


async def test_asks_accepted_and_not_placed_yet_count_against_free_capacity_others_are_owed(cluster):
    """16 accelerators free, t2 owed 12 of them: one non-preemptible ask of 8 is refused, and so
    was it split in two asks of 4 each submitted before a pass (each was judged as if nothing else
    waited; both were placed, and t2 could never claim its 12: non-preemptible work yields to no
    reservation). The second is refused now; a preemptible one is not (it yields)."""
    await add_tenant(cluster, "t2", reserved_accelerators=12.0)
    with pytest.raises(FailedPrecondition):
        await submit(cluster, deployment("ab", "t1", replicas=8, accelerators=1, locality="node"))
    await submit(cluster, deployment("a", "t1", replicas=4, accelerators=1, locality="node"))  # 4 <= 16 - 12
    with pytest.raises(FailedPrecondition) as refused:
        await submit(cluster, deployment("b", "t1", replicas=4, accelerators=1, locality="node"))
    assert refused.value.message == (
        "deployment b: 4 accelerators, not preemptible, would take capacity reserved for other tenants: 16 free "
        "on ready nodes (4 of it asked already by work accepted, not placed yet), 12 still owed (t2 12)")
    await submit(cluster, deployment("b", "t1", replicas=4, accelerators=1, locality="node", preemptible=True))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    async with cluster.unit_of_work() as uow:  # once placed, what waited is held: the same refusal
        assert await repo.waiting_unpreemptible(uow.session) == {}
    with pytest.raises(FailedPrecondition):
        await submit(cluster, deployment("c", "t1", replicas=1, accelerators=1, locality="node"))


async def test_an_ask_its_own_tenants_cap_holds_back_takes_no_free_capacity_from_others(cluster):
    """16 accelerators, t2 owed 8 of them; t3, capped at 4, holds 4 and asks 4 more, which wait
    for its own work to end (its cap), not for free capacity. Counted among the asks that take
    free capacity, it refused t1's ask of 4 that fitted (16 - 4 held - 8 owed)."""
    await add_tenant(cluster, "t2", reserved_accelerators=8.0)
    await add_tenant(cluster, "t3", max_accelerators=4.0)
    await submit(cluster, deployment("a", "t3", replicas=4, accelerators=1, locality="node"))
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await loop.reconcile_once()
    await submit(cluster, deployment("b", "t3", replicas=4, accelerators=1, locality="node"))
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:
        owed = await owed_capacity(uow)
    assert (owed.waiting, owed.waits("t3")) == ({"t3": 4.0}, 0.0)  # b waits for t3's cap alone
    await submit(cluster, deployment("c", "t1", replicas=4, accelerators=1, locality="node"))
    async with cluster.unit_of_work() as uow:
        assert (await owed_capacity(uow)).waits("t1") == 4.0
    with pytest.raises(FailedPrecondition):  # and what c takes is counted
        await submit(cluster, deployment("d", "t1", replicas=1, accelerators=1, locality="node"))


async def test_an_ask_its_own_tenants_power_cap_holds_back_takes_no_free_capacity_from_others(cluster):
    """As with `max_accelerators`: 16 accelerators, t2 owed 8 of them; t3, capped at 1,000 W, holds
    4 accelerators of 250 W and asks 4 more alike, which wait for its own work to end (its power
    cap), not for free capacity. Counted whole, they refused t1's ask of 4 that fitted (16 - 4
    held - 8 owed)."""
    await add_tenant(cluster, "t2", reserved_accelerators=8.0)
    await add_tenant(cluster, "t3", max_power_w=1000.0)
    await submit(cluster, deployment("a", "t3", replicas=4, accelerators=1, shard_power_w=250.0, locality="node"))
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish)
    await loop.reconcile_once()
    await submit(cluster, deployment("b", "t3", replicas=4, accelerators=1, shard_power_w=250.0, locality="node"))
    await loop.reconcile_once()
    async with cluster.unit_of_work() as uow:
        owed = await owed_capacity(uow)
    assert (owed.waiting, owed.waits("t3")) == ({"t3": 4.0}, 0.0)  # b waits for t3's power cap alone
    await submit(cluster, deployment("c", "t1", replicas=4, accelerators=1, locality="node"))
    with pytest.raises(FailedPrecondition):  # and what c takes is counted
        await submit(cluster, deployment("d", "t1", replicas=1, accelerators=1, locality="node"))


async def test_a_power_capped_tenants_waiting_asks_count_those_drawing_the_fewest_watts_first(cluster):
    """t2 owed 8 of the 16; t3, capped at 1,000 W, holds 2 accelerators of 250 W (500 W left) and
    waits for 2 of 400 W and 2 of 100 W: the 100 W ones fit in 200 W, and the 300 W left 0.75 of
    a 400 W one, so 2.75 take free capacity (the 400 W ones first: 1.25). An ask of 1 drawing no
    power is not bounded by the cap: 3.75, and 2.25 are left to t1 (14 - 8 owed - 3.75; the
    400 W ones first, 3.75)."""
    await add_tenant(cluster, "t2", reserved_accelerators=8.0)
    await add_tenant(cluster, "t3", max_power_w=1000.0)
    await submit(cluster, deployment("a", "t3", replicas=2, accelerators=1, shard_power_w=250.0, locality="node"))
    await Reconciler(cluster, push=lambda nodes: None, publish=no_publish).reconcile_once()
    await submit(cluster, deployment("x", "t3", replicas=2, accelerators=1, shard_power_w=400.0, locality="node"))
    await submit(cluster, deployment("y", "t3", replicas=2, accelerators=1, shard_power_w=100.0, locality="node"))
    async with cluster.unit_of_work() as uow:
        owed = await owed_capacity(uow)
    assert (owed.waiting, owed.power_room, owed.waits("t3")) == ({"t3": 4.0}, {"t3": 500.0}, pytest.approx(2.75))
    await submit(cluster, deployment("z", "t3", replicas=1, accelerators=1, locality="node"))
    async with cluster.unit_of_work() as uow:
        assert (await owed_capacity(uow)).waits("t3") == pytest.approx(3.75)
    with pytest.raises(FailedPrecondition):
        await submit(cluster, deployment("c", "t1", replicas=3, accelerators=1, locality="node"))
    await submit(cluster, deployment("c", "t1", replicas=2, accelerators=1, locality="node"))


def test_a_tenants_waiting_asks_take_the_least_its_caps_leave_and_asks_added_count_by_their_watts():
    """`OwedCapacity.waits` combines the clamps: the accelerators `max_accelerators` leaves, and
    those the watts `max_power_w` leaves hold (0 W ones whole, then the fewest watts an accelerator
    first). An ask a batch adds at fewer watts an accelerator holds more in the same watts."""
    owed = OwedCapacity({}, 16.0, {"t": 6.0}, room={"t": 3.0}, power_room={"t": 500.0},
                        waiting_by_power_w={"t": {400.0: 3.0, 0.0: 1.0, 100.0: 2.0}})
    assert owed.waits("t") == 3.0  # the accelerators' cap: 3 of the power cap's 1 + 2 + 0.75
    owed.room["t"] = 5.0
    assert owed.waits("t") == pytest.approx(3.75)
    owed.took("t", 2.0, 50.0)  # 100 W: 1 + 2 + 2 + 0.5 of the 400 W ones
    assert (owed.waiting["t"], owed.waits("t")) == (8.0, 5.0)
    owed.room.clear()
    assert owed.waits("t") == pytest.approx(5.5)
    owed.took("u", 4.0, 100.0)  # no cap: whole
    assert owed.waits("u") == 4.0 and "u" not in owed.waiting_by_power_w


async def test_a_tenant_owed_capacity_itself_takes_no_more_of_others_by_splitting_its_ask(cluster):
    """t3 owed 4, t2 owed 12 of the 16 free: t3's first ask of 4 is its own; a second was taken
    too (its waiting ask within its own reservation was counted as neither free nor owed), and t2
    could never claim its 12."""
    await add_tenant(cluster, "t3", reserved_accelerators=4.0)
    await add_tenant(cluster, "t2", reserved_accelerators=12.0)
    await submit(cluster, deployment("a", "t3", replicas=4, accelerators=1, locality="node"))
    with pytest.raises(FailedPrecondition):
        await submit(cluster, deployment("b", "t3", replicas=4, accelerators=1, locality="node"))
