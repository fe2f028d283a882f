"""The whole-cluster snapshot: the event loop's CPU, its longest step and the wall time of one, by cluster size.

In process, no gRPC: a database preloaded (`bench.preload`) with `--nodes` nodes and
`--placements` running single-shard deployments, then `--rounds` snapshots
(`store.snapshot.load_snapshot`: what a dry run, `maiactl snapshot` and a reconciler's full pass
read: the rows read on the loop, the snapshot built from them in a worker thread), each in a unit
of work of its own. Per snapshot: the event loop thread's CPU (`time.thread_time`: what the loop
cannot serve meanwhile), the process's (the worker thread's build and the database driver's
thread too), the wall time and the statements sent; then as many snapshots again beside a task
that sleeps 1 ms in a loop, for the longest the loop went without turning (its longest step, what
an RPC or a heartbeat arriving meanwhile waits at worst). Medians. To run it against an older
tree, copy this file into that tree's bench/ (it needs only `load_snapshot` and `bench.assignments`).

    python -m bench.snapshot --nodes 4096 16384 --placements 10000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench.assignments import Measured, main_by_cluster_size, preloaded
from controller.store.db import Database
from controller.store.snapshot import Snapshot, load_snapshot


async def _snapshot(db: Database) -> Snapshot:
    async with db.unit_of_work() as uow:
        return await load_snapshot(uow.session)


async def _longest_step(db: Database) -> float:
    """The longest gap between the turns of a task sleeping 1 ms while one snapshot is read (s)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    gaps.clear()
    started = time.perf_counter()
    await _snapshot(db)
    done.set()
    await ticker
    return max(gaps, default=time.perf_counter() - started)


async def run(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    async with preloaded(nodes, args.placements, "maia-bench-snapshot-") as (db, _layout):
        measured = Measured(db)
        walls: list[float] = []
        snap: Snapshot | None = None
        for i in range(args.warmup + args.rounds):
            snap = None  # the last one freed outside the measured call
            started = time.perf_counter()
            with measured.call(counted=i >= args.warmup):
                snap = await _snapshot(db)
            if i >= args.warmup:
                walls.append(time.perf_counter() - started)
        assert snap is not None
        deployments, placements = len(snap.problem["deployments"]), len(snap.problem["placements"])
        snap = None
        steps = [await _longest_step(db) for _ in range(args.rounds)]
    if deployments != args.placements or placements != args.placements:
        raise RuntimeError(f"the snapshot holds {deployments} deployments and {placements} placements, "
                           f"{args.placements} were preloaded")
    return {"nodes": nodes, "placements": args.placements, "rounds": args.rounds,
            "wall_ms_per_snapshot_p50": round(statistics.median(walls) * 1000, 1),
            "longest_loop_step_ms_p50": round(statistics.median(steps) * 1000, 1),
            **measured.figures("snapshot", "snapshot", 1)}


def main() -> None:
    main_by_cluster_size(__doc__, run, nodes=[4096, 16384], placements=10000, rounds=5, warmup=1, counted="snapshots")


if __name__ == "__main__":
    main()
