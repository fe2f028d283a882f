"""Online batches defer big fractions that would open one of the last empty accelerators
(scheduler/defer.py), and only then."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from builders import codes, dep, messages, node, placed, placed_count, problem, solve_doc  # noqa: E402
from checker import check_plan  # noqa: E402

from scheduler import plan_to_dict  # noqa: E402
from scheduler.defer import MIN_MILLI  # noqa: E402

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


BATCH = [dep("big", acc=1, accelerator_milli=810, locality="node"),
         dep("pair", acc=1, accelerator_milli=650, locality="node")]


def test_the_constants_make_these_cases_what_they_say() -> None:
    assert 1 / 8 < EMPTY_SHARE < 9 / 16  # one node: 1 of 8 empty; two: 9 of 16
    assert 650 >= MIN_MILLI and 810 >= MIN_MILLI


def test_a_tight_batch_defers_the_fraction_that_would_open_the_last_empty_accelerator() -> None:
    doc = cluster(1, BATCH, batch_size=2)
    plan = solve_doc(doc)
    assert check_plan(doc, plan_to_dict(plan)) == []
    # The 650 pairs with the running 320 (it opens nothing): placed. The 810 would sit alone
    # on the only empty accelerator: deferred, and the plan says so.
    assert placed_count(plan, "pair") == 1 and placed_count(plan, "big") == 0
    assert [p.accelerator_indices for p in plan.placements if p.deployment == "pair"] == [(6,)]
    assert codes(plan, "big") == {"CAPACITY"}
    assert "deferred" in messages(plan, "big") and "1 empty accelerators of 8" in \
        messages(plan, "big")
    assert plan.stats["deferred_replicas"] == 1


def test_a_batch_with_empty_accelerators_to_spare_defers_nothing() -> None:
    doc = cluster(2, BATCH, batch_size=2)
    plan = solve_doc(doc)
    assert placed_count(plan, "big") == 1 and placed_count(plan, "pair") == 1
    assert "deferred_replicas" not in plan.stats


def test_one_arrival_at_a_time_places_what_fits_even_when_tight() -> None:
    plan = solve_doc(cluster(1, BATCH))
    assert placed_count(plan, "big") == 1 and placed_count(plan, "pair") == 1


def test_small_fractions_and_whole_tasks_are_never_deferred() -> None:
    small = [dep("half", acc=1, accelerator_milli=MIN_MILLI - 10, locality="node"),
             dep("whole", acc=1, locality="node")]
    plan = solve_doc(cluster(1, small, batch_size=2))
    # One empty accelerator and the 320's 680: both arrivals are placed.
    assert placed_count(plan, "half") == 1 and placed_count(plan, "whole") == 1
    assert "deferred_replicas" not in plan.stats


def test_a_running_replica_is_never_taken_out() -> None:
    # "big" already runs one replica alone on n0's last accelerator and asks for a second:
    # the batch is tight (no empty accelerator left), the running one stays where it is.
    grown = dep("big", acc=1, accelerator_milli=810, locality="node", replicas=2)
    doc = cluster(1, [grown, dep("other", acc=1, accelerator_milli=100, locality="node")],
                  batch_size=2)
    doc["placements"].append(placed("big", "n0", [7], milli=810))
    plan = solve_doc(doc)
    assert [(p.replica, p.accelerator_indices) for p in plan.placements
            if p.deployment == "big"] == [(0, (7,))]
    assert "deferred_replicas" not in plan.stats
