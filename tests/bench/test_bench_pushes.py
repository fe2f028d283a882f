"""bench.pushes and bench.heartbeats on a tiny cluster: they run and count what they measure (no timing judged)."""

from __future__ import annotations

import argparse

from bench import pushes


async def test_pushes_reaches_every_changed_node_each_round() -> None:
    result = await pushes.run(argparse.Namespace(nodes=32, placements=40, changed=8, rounds=2))
    assert (result["nodes"], result["placements"], result["changed"], result["rounds"]) == (32, 40, 8, 2)
    assert result["wall_ms_p50"] > 0 and result["cpu_ms_p50"] >= 0


async def test_heartbeats_are_sent_and_flushed() -> None:
    from bench import heartbeats
    result = await heartbeats.run(argparse.Namespace(nodes=32, placements=40, interval=0.2, warmup=0.5, seconds=1.0))
    assert result["nodes"] == 32 and result["heartbeats_per_s"] > 0 and result["cpu_ms_per_heartbeat"] > 0
