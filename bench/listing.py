"""Every deployment listed a page at a time, as `maiactl get deployments` and a new watch read
them: the event loop's CPU, by page size.

In process, no gRPC: a database preloaded (`bench.preload`) with `--nodes` nodes holding
`--placements` running single-shard deployments, then `--rounds` listings of all of them
(`usecases.deployments.list_deployments` as an admin, `--page-size` a page, each page in a unit of
work of its own). Per listing: the event loop thread's CPU (`time.thread_time`) in all, and a
page's (median); the statements a page. To run it against an older tree, copy this file into that
tree's bench/ (it needs only `list_deployments` and `bench.assignments`).

    python -m bench.listing --nodes 4096 --placements 10000 --page-size 100 500
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
from controller.identity import Principal
from controller.usecases.deployments import list_deployments
from controller.usecases.paging import PageRequest


async def run(args: argparse.Namespace, size: int) -> dict[str, Any]:
    async with preloaded(args.nodes, args.placements, "maia-bench-listing-") as (db, _layout):
        measured = Measured(db)
        admin = Principal("admin")
        listings: list[float] = []
        for i in range(args.warmup + args.rounds):
            page, listed, started = PageRequest(size), 0, time.thread_time()
            while True:
                with measured.call(counted=i >= args.warmup):
                    async with db.unit_of_work() as uow:
                        got = await list_deployments(uow, admin, "", page)
                listed += len(got.items)
                if not got.next_token:
                    break
                page = PageRequest(size, got.next_token)
            if i >= args.warmup:
                listings.append(time.thread_time() - started)
            if listed != args.placements:
                raise RuntimeError(f"listed {listed} deployments, {args.placements} were preloaded")
    return {"nodes": args.nodes, "placements": args.placements, "page_size": size, "rounds": args.rounds,
            "loop_cpu_ms_per_listing_p50": round(statistics.median(listings) * 1000, 1),
            **measured.figures("page", "page", 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096, help=f"simulated nodes (a multiple of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=10000, help="running single-shard deployments on them")
    p.add_argument("--page-size", type=int, nargs="+", default=[100, 500], help="deployments a page")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="listings first, not counted")
    args = p.parse_args()
    for size in args.page_size:
        print(json.dumps(asyncio.run(run(args, size))))


if __name__ == "__main__":
    main()
