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
import asyncio
import json
import statistics
import time
from typing import Any

from bench.assignments import Measured, preloaded
from bench.e2e import NODES_PER_RACK
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[4096, 16384],
                   help=f"simulated nodes (multiples of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=1000, help="running single-shard deployments on them")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="rebuilds first, not counted")
    args = p.parse_args()
    for nodes in args.nodes:
        print(json.dumps(asyncio.run(run(args, nodes))))


if __name__ == "__main__":
    main()
