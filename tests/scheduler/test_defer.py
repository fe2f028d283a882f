"""Online batches defer big fractions that would open one of the last empty accelerators
(scheduler/defer.py), and only then."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from builders import codes, dep, messages, node, placed, placed_count, problem, solve_doc  # noqa: E402
from checker import check_plan  # noqa: E402

from scheduler import plan_to_dict, problem_from_dict  # noqa: E402
from scheduler.defer import MIN_MILLI, WHOLE_COVER, expected_whole, tight  # noqa: E402
from scheduler.solve import Solver  # noqa: E402

Doc = dict[str, Any]


def cluster(nodes: int, batch: list[Doc], **options: Any) -> Doc:
    """`nodes` nodes of 8 accelerators; on the first, 6 whole tasks and a 320 fraction
    running (one accelerator left empty), the others empty; then `batch` arrives."""
    running = [dep(f"w{i}", acc=1, locality="node") for i in range(6)]
    running.append(dep("small", acc=1, accelerator_milli=320, locality="node"))
    placements = [placed(f"w{i}", "n0", [i]) for i in range(6)]
    placements.append(placed("small", "n0", [6], milli=320))
    return problem([node(f"n{i}", acc=8, cpu_milli=64_000) for i in range(nodes)],
                   [*running, *batch], placements=placements, mode="online", **options)


# A big fraction, one that pairs with the running 320, and whole tasks of two accelerators
# (the workload's whole demand: 2000 of the 3460 milli asked).
BATCH = [dep("big", acc=1, accelerator_milli=810, locality="node"),
         dep("pair", acc=1, accelerator_milli=650, locality="node"),
         dep("two", acc=2, locality="node")]


def test_the_constants_make_these_cases_what_they_say() -> None:
    share = 2000 / 3460
    # One node: 1 empty accelerator of 8, 1,680 milli free: whole tasks expected to ask for
    # ~1 accelerator; three nodes: 17 empty, 17,680 free, ~10.
    assert 1 < WHOLE_COVER * share * 1.680
    assert WHOLE_COVER * share * 17.680 < 17
    assert 650 >= MIN_MILLI and 810 >= MIN_MILLI


def test_a_tight_batch_defers_the_fraction_that_would_open_the_last_empty_accelerator() -> None:
    doc = cluster(1, BATCH, batch_size=3)
    plan = solve_doc(doc)
    assert check_plan(doc, plan_to_dict(plan)) == []
    # The 650 pairs with the running 320 (it opens nothing): placed. The 810 would sit alone
    # on the only empty accelerator: deferred, and the plan says so. (The two-accelerator
    # task finds one empty accelerator only.)
    assert placed_count(plan, "pair") == 1 and placed_count(plan, "big") == 0
    assert [p.accelerator_indices for p in plan.placements if p.deployment == "pair"] == [(6,)]
    assert codes(plan, "big") == {"CAPACITY"}
    assert "deferred" in messages(plan, "big") and "1 empty accelerators of 8" in \
        messages(plan, "big")
    assert plan.stats["deferred_replicas"] == 1


def test_a_batch_with_empty_accelerators_to_spare_defers_nothing() -> None:
    plan = solve_doc(cluster(3, BATCH, batch_size=3))
    assert [placed_count(plan, d) for d in ("big", "pair", "two")] == [1, 1, 1]
    assert "deferred_replicas" not in plan.stats


def test_a_workload_without_whole_tasks_defers_nothing() -> None:
    # The same single empty accelerator, but nothing seen asks for whole accelerators.
    plan = solve_doc(cluster(1, BATCH[:2], batch_size=2))
    assert placed_count(plan, "big") == 1 and placed_count(plan, "pair") == 1
    assert "deferred_replicas" not in plan.stats


def test_what_the_solve_left_out_is_not_demand_still_to_come() -> None:
    solver = Solver(problem_from_dict(cluster(1, BATCH, batch_size=3)), None)
    for d in solver.state.deps[-len(BATCH):]:  # the batch, as `place_batch` observes it
        solver.workload.observe(d.shard, d.replicas)
    squeeze = tight(solver)
    assert squeeze is not None and (squeeze.empty, squeeze.ready) == (1, 8)
    assert squeeze.whole == pytest.approx(2000 / 3460 * 1.680)
    # The two-accelerator task decided and left out: 2,000 milli fewer to come, not tight.
    two = solver.topo.deployment_index["two"]
    solver.why[two] = ()
    assert expected_whole(solver) == 0.0  # 1,680 milli free, 2,000 left out
    assert tight(solver) is None


def test_one_arrival_at_a_time_places_what_fits_even_when_tight() -> None:
    plan = solve_doc(cluster(1, BATCH))
    assert placed_count(plan, "big") == 1 and placed_count(plan, "pair") == 1


def test_small_fractions_and_whole_tasks_are_never_deferred() -> None:
    small = [dep("half", acc=1, accelerator_milli=MIN_MILLI - 10, locality="node"),
             dep("whole", acc=1, locality="node")]
    plan = solve_doc(cluster(1, small, batch_size=2))
    # Tight (one empty accelerator, whole tasks expected), yet both arrivals are placed:
    # the 590 beside the 320, the whole task on the empty accelerator.
    assert placed_count(plan, "half") == 1 and placed_count(plan, "whole") == 1
    assert "deferred_replicas" not in plan.stats


def test_a_running_replica_is_never_taken_out() -> None:
    # "big" already runs one replica alone on n0's last accelerator and asks for a second:
    # the batch is tight (no empty accelerator left, whole tasks expected), the running one
    # stays where it is.
    grown = dep("big", acc=1, accelerator_milli=810, locality="node", replicas=2)
    doc = cluster(1, [grown, dep("other", acc=1, accelerator_milli=100, locality="node"),
                      dep("two", acc=2, locality="node")], batch_size=3)
    doc["placements"].append(placed("big", "n0", [7], milli=810))
    plan = solve_doc(doc)
    assert [(p.replica, p.accelerator_indices) for p in plan.placements
            if p.deployment == "big"] == [(0, (7,))]
    assert "deferred_replicas" not in plan.stats


def test_an_empty_cluster_is_never_tight_however_much_asks_for_whole_accelerators() -> None:
    # 6,000 of the 6,810 milli asked are whole: 1.3 x 88 % of the free milli is more than
    # the 8 empty accelerators, but they could take all the demand still to come.
    batch = [BATCH[0], dep("four", acc=4, locality="node"), BATCH[2]]
    assert WHOLE_COVER * 6000 / 6810 > 1
    doc = problem([node("n0", acc=8, cpu_milli=64_000)], batch, mode="online", batch_size=3)
    plan = solve_doc(doc)
    assert [placed_count(plan, d) for d in ("big", "four", "two")] == [1, 1, 1]
    assert "deferred_replicas" not in plan.stats
