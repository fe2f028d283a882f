"""The capacity index's rebuild: the event loop's CPU and the wall time of one, by cluster size.

In process, no gRPC: a database preloaded (`bench.preload`) with `--nodes` nodes and
`--placements` running single-shard deployments, then `--rounds` rebuilds of the submit path's
capacity index (`usecases.capacity.load_index`: the read of every node's plain columns, then the
index built in a worker thread), each in a unit of work of its own. Per rebuild: the event loop
thread's CPU (`time.thread_time`: what the loop cannot serve meanwhile), the process's (the
worker thread's build and the database driver's thread too), the wall time and the statements
sent; medians. To run it against an older tree, copy this file into that tree's bench/ (it needs
only `load_index` and `bench.assignments`).

    python -m bench.capacity --nodes 4096 16384 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.assignments import Measured, main_by_cluster_size, preloaded
from controller.usecases.capacity import load_index


async def run(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    async with preloaded(nodes, args.placements, "maia-bench-capacity-") as (db, _layout):
        measured = Measured(db)
        walls: list[float] = []
        for i in range(args.warmup + args.rounds):
            started = time.perf_counter()
            with measured.call(counted=i >= args.warmup):
                async with db.unit_of_work() as uow:
                    index = await load_index(uow)
            if i >= args.warmup:
                walls.append(time.perf_counter() - started)
        if index.empty():
            raise RuntimeError("the preloaded cluster's capacity index is empty")
    return {"nodes": nodes, "placements": args.placements, "rounds": args.rounds,
            "wall_ms_per_rebuild_p50": round(statistics.median(walls) * 1000, 2),
            **measured.figures("rebuild", "rebuild", 1)}


def main() -> None:
    main_by_cluster_size(__doc__, run, nodes=[4096, 16384], placements=1000, rounds=20, warmup=2, counted="rebuilds")


if __name__ == "__main__":
    main()
