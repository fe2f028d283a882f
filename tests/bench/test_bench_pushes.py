"""bench.pushes on a tiny cluster: every changed node gets its set each round (no timing judged)."""

from __future__ import annotations

import argparse

from bench import pushes


async def test_pushes_reaches_every_changed_node_each_round() -> None:
    result = await pushes.run(argparse.Namespace(nodes=32, placements=40, changed=8, rounds=2))
    assert (result["nodes"], result["placements"], result["changed"], result["rounds"]) == (32, 40, 8, 2)
    assert result["wall_ms_p50"] > 0 and result["cpu_ms_p50"] >= 0
