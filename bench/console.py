"""The web console's document: the event loop's CPU and the process's for one, by cluster size.

In process, no HTTP: a database preloaded (`bench.preload`) with `--nodes` nodes holding
`--placements` running single-shard deployments, then `--rounds` documents
(`console.state.console_state`, the operator's view), each in a unit of work of its own, encoded
as the server sends it (JSON). Per document: the event loop thread's CPU (`time.thread_time`:
what the controller's loop cannot serve meanwhile), the process's (a worker thread's too), the
statements sent and the encoded size; medians. To run it against an older tree, copy this file
into that tree's bench/ (it needs only `console_state` and `bench.assignments`).

    python -m bench.console --nodes 4096 16384 --placements 10000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bench.assignments import Measured, main_by_cluster_size, preloaded
from controller.console.state import console_state


async def run(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    async with preloaded(nodes, args.placements, "maia-bench-console-") as (db, _layout):
        measured = Measured(db)
        sizes: list[int] = []
        for i in range(args.warmup + args.rounds):
            with measured.call(counted=i >= args.warmup):
                async with db.unit_of_work() as uow:
                    doc = await console_state(uow.session)
                body = await asyncio.to_thread(json.dumps, doc)  # as the server encodes it, off the loop
            sizes.append(len(body))
        deployments = len(doc["deployments"])
    if deployments != args.placements:
        raise RuntimeError(f"the document lists {deployments} deployments, {args.placements} were preloaded")
    return {"nodes": nodes, "placements": args.placements, "rounds": args.rounds, "bytes": sizes[-1],
            **measured.figures("document", "document", 1)}


def main() -> None:
    main_by_cluster_size(__doc__, run, nodes=[4096], placements=10000, rounds=5, warmup=1, counted="documents")


if __name__ == "__main__":
    main()
