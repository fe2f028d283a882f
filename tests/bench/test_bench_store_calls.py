"""bench.assignments, bench.reportflush, bench.capacity, bench.console, bench.listing and bench.snapshot on a tiny cluster: they run and count what they measure
(no timing judged)."""

from __future__ import annotations

import argparse

from bench import assignments, capacity, console, listing, reportflush, snapshot


async def test_assignments_reads_the_sets_of_the_nodes_asked_in_two_statements() -> None:
    result = await assignments.run(argparse.Namespace(nodes=32, placements=40, changed=8, rounds=3, warmup=1, seed=1))
    assert (result["nodes"], result["changed"], result["rounds"]) == (32, 8, 3)
    assert result["statements_per_read"] == 2 and result["assignments_per_node"] > 0
    assert result["loop_cpu_ms_per_node"] > 0


async def test_reportflush_changes_a_deployment_per_report() -> None:
    result = await reportflush.run(argparse.Namespace(nodes=32, placements=40, reports=8, rounds=3, warmup=1, seed=1,
                                                      py_spy=None))
    assert (result["reports"], result["rounds"]) == (8, 3)
    assert result["views_per_flush"] == 8 and result["statements_per_flush"] >= 4
    assert result["loop_cpu_ms_per_report"] > 0


async def test_capacity_rebuilds_the_index_from_one_statement() -> None:
    result = await capacity.run(argparse.Namespace(placements=40, rounds=3, warmup=1), 32)
    assert (result["nodes"], result["rounds"]) == (32, 3)
    assert result["statements_per_rebuild"] == 1
    assert result["loop_cpu_ms_per_rebuild"] > 0 and result["wall_ms_per_rebuild_p50"] > 0


async def test_console_makes_the_operators_document_of_every_deployment() -> None:
    result = await console.run(argparse.Namespace(placements=40, rounds=2, warmup=1), 32)
    assert (result["nodes"], result["placements"], result["rounds"]) == (32, 40, 2)
    assert result["statements_per_document"] >= 8 and result["bytes"] > 0
    assert result["loop_cpu_ms_per_document"] > 0


async def test_listing_pages_through_every_deployment_in_two_statements_a_page() -> None:
    result = await listing.run(argparse.Namespace(nodes=32, placements=40, rounds=2, warmup=1), 16)
    assert (result["page_size"], result["rounds"]) == (16, 2)
    assert result["statements_per_page"] == 2  # the keys, then the page by ids (an admin: no tenants read)
    assert result["loop_cpu_ms_per_listing_p50"] > 0


async def test_snapshot_reads_the_cluster_in_nine_statements() -> None:
    result = await snapshot.run(argparse.Namespace(placements=40, rounds=2, warmup=1), 32)
    assert (result["nodes"], result["placements"], result["rounds"]) == (32, 40, 2)
    assert result["statements_per_snapshot"] == 9  # the head-of-line nominations stored included
    assert result["loop_cpu_ms_per_snapshot"] > 0 and result["longest_loop_step_ms_p50"] > 0
