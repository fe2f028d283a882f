"""bench commit at a toy size: it runs, both modes commit every replica, the cache it keeps from
`CommitResult.shards` stays equal to the database (no timing asserted)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench import commit
from bench.watchdog import loaded_problem


def test_both_modes_commit_every_replica(tmp_path: Path) -> None:
    doc = loaded_problem(128, 0.3, 1)
    args = argparse.Namespace(sizes=[1, 3], repeat=2)
    result = asyncio.run(commit._run(args, "sqlite", doc, tmp_path))
    assert result["turned_away"] == 0 and result["cache_matches"]
    assert [(t.size, t.scoped, len(t.commit_ms)) for t in result["timings"]] == [
        (1, False, 1), (1, True, 1), (3, False, 1), (3, True, 1)]
    unscoped, scoped = result["timings"][:2]
    assert 0 < scoped.rows_read < unscoped.rows_read
