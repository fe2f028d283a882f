"""Two reconcilers on one database (as a deposed leader's late pass and the new leader's would)
solve the same submissions concurrently: the plan applier lands what still fits of each plan and
re-queues the rest, so the committed state never double-books an accelerator or breaks a
contract or a power budget (graded by the independent checker), and everything gets placed."""

from __future__ import annotations

import asyncio

from bench.checking import check_state
from controller.reconcile import Reconciler
from controller.store.db import Database
from controller.store.snapshot import load_snapshot
from controller.usecases import planning
from uc_builders import add_nodes, add_tenant, apply_topology, deployment, no_publish, submit


async def test_concurrent_reconcilers_commit_a_checker_clean_state(database: Database) -> None:
    # Two racks of four 4-accelerator nodes, a power budget that binds, two tenants that exclude each other.
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"}, rack_budget_w=4000.0)
    for rack in ("rack-a", "rack-b"):
        await add_nodes(database, rack, 4)
    await add_tenant(database, "t2", isolation="dedicated_node")
    await add_tenant(database, "t1", excludes=("t2",))
    for i in range(6):
        await submit(database, deployment(f"a{i}", "t1", replicas=2, accelerators=1, shard_power_w=300.0))
        await submit(database, deployment(f"b{i}", "t2", replicas=1, accelerators=2, shard_power_w=300.0))
    # The first two solves (one a reconciler, on the same stored state) wait for each other before
    # either commits: the second commit then lands on the first, however the host schedules them.
    first_two = asyncio.Barrier(2)
    solves = 0

    async def solve_side_by_side(problem, *, time_limit_ms):  # noqa: ANN001, ANN202
        nonlocal solves
        plan = await planning.solve_online_first(problem, time_limit_ms=time_limit_ms)
        solves += 1
        if solves <= 2:
            await asyncio.wait_for(first_two.wait(), timeout=60)
        return plan

    loops = [Reconciler(database, push=lambda nodes: None, publish=no_publish, retry_backoff_s=0.0,
                        solve=solve_side_by_side)
             for _ in range(2)]

    stale = 0
    for _ in range(4):
        outcomes = await asyncio.gather(*(loop.reconcile_once(force=True) for loop in loops))
        stale += sum(o.conflicts for o in outcomes)
    assert stale >= 1  # the plans did land on each other
    async with database.unit_of_work() as uow:
        state = await load_snapshot(uow.session)
    placements = state.problem["placements"]
    assert check_state(state.problem, placements) == []
    assert len({(p["node"], i) for p in placements for i in p["accelerator_indices"]}) == \
        sum(len(p["accelerator_indices"]) for p in placements)  # no accelerator twice
    assert placements, "something was placed"
