"""The scheduling queue's rules (controller/scheduling/queue.py), on small problem documents:
what is unschedulable, which changes move it back to active, the back-off and the depths."""

from __future__ import annotations

from typing import Any

import pytest

from controller.scheduling.queue import QueueDepths, SchedulingQueue
from scheduler import Plan, Reason, Unplaced


def problem(*, nodes: int = 2, placed: dict[str, Any] | None = None, big: dict[str, Any] | None = None,
            tenants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    runner = {"id": "t/run", "tenant": "t", "replicas": 1, "shards_per_replica": 1,
              "shard": {"accelerators": 4}, "priority": 10, "preemptible": False, **(placed or {})}
    hopeless = {"id": "t/big", "tenant": "t", "replicas": 1, "shards_per_replica": 8,
                "shard": {"accelerators": 4}, "priority": 50, **(big or {})}
    return {"version": 1, "nodes": [{"id": f"n{i}", "rack": "r", "accelerators": 4} for i in range(nodes)],
            "tenants": tenants or [{"id": "t"}], "deployments": [runner, hopeless],
            "placements": [{"deployment": "t/run", "replica": 0, "shard": 0, "node": "n0", "accelerator_indices": [0, 1, 2, 3]}]}


WHY = Unplaced("t/big", 1, (Reason("CAPACITY", "0/2 nodes fit"),))


def parked(first: dict[str, Any]) -> SchedulingQueue:
    queue = SchedulingQueue(backoff_s=1.0)
    queue.after_commit(first, Plan(status="feasible", placements=(), unplaced=(WHY,)), time_limited=False)
    assert queue.depths() == QueueDepths(unschedulable=1)
    return queue


def test_unschedulable_work_is_left_out_with_its_reasons():
    queue = parked(problem())
    admitted, waiting = queue.admit(problem())
    assert [d["id"] for d in admitted["deployments"]] == ["t/run"] and waiting == (WHY,)
    assert queue.with_waiting(Plan(status="optimal", placements=()), waiting).unplaced == (WHY,)


@pytest.mark.parametrize("change, helps", [
    ({}, False),
    ({"nodes": 3}, True),                                   # a node joined
    ({"tenants": [{"id": "t", "max_accelerators": 8}]}, True),  # a contract changed
    ({"placed": {"preemptible": True}}, True),              # running work became preemptible
    ({"placed": {"priority": 5}}, False),                   # lower, but not preemptible
    ({"placed": {"priority": 100}}, False),                 # harder to preempt
])
def test_what_moves_unschedulable_work_back_to_active(change: dict[str, Any], helps: bool):
    queue = parked(problem())
    admitted, waiting = queue.admit(problem(**change))
    assert (not waiting) == helps
    assert ("t/big" in {d["id"] for d in admitted["deployments"]}) == helps


def test_a_preemptible_runner_at_a_lower_priority_helps_and_an_own_spec_change_goes_alone():
    queue = parked(problem(placed={"preemptible": True, "priority": 60}))
    assert queue.admit(problem(placed={"preemptible": True, "priority": 60}))[1] == (WHY,)
    assert queue.admit(problem(placed={"preemptible": True, "priority": 20}))[1] == ()
    queue = parked(problem())
    admitted, waiting = queue.admit(problem(big={"shards_per_replica": 2}))  # its own spec changed
    assert waiting == () and "t/big" in {d["id"] for d in admitted["deployments"]}


def test_a_departure_helps():
    queue = parked(problem())
    gone = problem()
    gone["placements"] = []
    assert queue.admit(gone)[1] == ()


def test_back_off_is_due_after_its_time_and_ends_with_the_full_solve():
    queue = SchedulingQueue(backoff_s=1.0)
    queue.arrived(3)
    queue.back_off(["t/a", "t/b"], now=10.0)
    queue.back_off(["t/a"], now=10.5)  # already waiting: its time stays
    assert queue.depths() == QueueDepths(active=3, backoff=2)
    assert not queue.backoff_due(10.9) and queue.backoff_due(11.0)
    queue.after_commit(problem(), Plan(status="optimal", placements=()), time_limited=False)
    assert queue.depths() == QueueDepths() and not queue.backoff_due(99.0)


def test_a_time_limited_solve_parks_nothing():
    queue = SchedulingQueue()
    queue.after_commit(problem(), Plan(status="feasible", placements=(), unplaced=(WHY,)), time_limited=True)
    assert len(queue) == 0


def test_a_departure_of_what_a_plan_placed_helps():
    """What the full solve's plan placed, and a fast pass after it (`placed`), count among the
    placements whose departure could help (only the problem's, from before the solve, did)."""
    from scheduler import Placement

    new = Placement("t/new", 0, 0, "n1", (0,))
    queue = SchedulingQueue(backoff_s=1.0)
    queue.after_commit(problem(), Plan(status="feasible", placements=(new,), unplaced=(WHY,)), time_limited=False)
    later = problem()
    later["placements"] = [*later["placements"], {"deployment": "t/new", "replica": 0, "shard": 0, "node": "n1",
                                                  "accelerator_indices": [0]}]
    assert queue.admit(later)[1] == (WHY,)
    assert queue.admit(problem())[1] == ()  # t/new gone: big is let go

    queue = parked(problem())
    queue.placed(Plan(status="feasible", placements=(new,)))  # a fast pass placed it
    assert queue.admit(later)[1] == (WHY,)
    assert queue.admit(problem())[1] == ()


def test_with_nothing_parked_the_placements_of_fast_passes_are_not_kept():
    """The placements kept for parked work grow with every fast pass until the next full solve;
    with nothing parked there is nothing they could help, so they are let go, and what is parked
    later (by a full solve's commit) starts from that solve's own."""
    from scheduler import Placement

    queue = parked(problem())
    queue.forget(["t/big"])  # deleted: nothing is parked
    for i in range(50):
        queue.placed(Plan(status="feasible", placements=(Placement(f"t/f{i}", 0, 0, "n1", (0,)),)))
    assert queue._seen is None
    queue.after_commit(problem(), Plan(status="feasible", placements=(), unplaced=(WHY,)), time_limited=False)
    assert queue.admit(problem())[1] == (WHY,)
