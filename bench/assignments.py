"""Assignment-set reads alone: the controller's CPU per node whose set a commit changed.

In process, no gRPC and no hub: a database preloaded (`bench.preload`) with `--nodes` nodes
holding `--placements` running single-shard deployments, then `--rounds` reads of the sets of
`--changed` random nodes, each as the hub reads a commit's changed nodes (`repo.assignment_sets`
in a unit of work of its own). Per round: the event loop thread's CPU (`time.thread_time`: the
ORM, the row processing, building the sets) and the process's (the database driver's thread
with SQLite itself too), the statements sent and the assignments read; the figures are medians
per node read. Counts, not latencies: steadier on a shared machine. Runs against an older tree
too (`PYTHONPATH=<old tree>:<old tree>/proto python bench/assignments.py`), as `bench.pushes`.

    python -m bench.assignments --nodes 4096 --placements 10000 --changed 32 --rounds 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bench.e2e import NODES_PER_RACK, Shape
from bench.preload import preload
from controller.store import repositories as repo
from controller.store.db import Database


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="maia-bench-assignments-") as root:
        url = f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}"
        layout = Shape(args.nodes, 1, args.placements).layout()
        await preload(url, layout, placements=args.placements, tenants=["bench"], nodes_up=True)
        nodes = [n.node_id for n in layout.nodes()]
        db = Database(url)
        sent = 0

        def count(*_args: Any) -> None:
            nonlocal sent
            sent += 1

        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        pick = random.Random(args.seed)
        loop_cpu, process_cpu, statements, read = [], [], [], 0
        try:
            for i in range(args.warmup + args.rounds):
                changed = pick.sample(nodes, args.changed)
                sent_before, thread, process = sent, time.thread_time(), time.process_time()
                async with db.unit_of_work() as uow:
                    sets = await repo.assignment_sets(uow.session, changed)
                thread, process = time.thread_time() - thread, time.process_time() - process
                if i >= args.warmup:
                    loop_cpu.append(thread)
                    process_cpu.append(process)
                    statements.append(sent - sent_before)
                    read += sum(len(s.assignments) for s in sets.values())
        finally:
            await db.dispose()
    per_node = 1000 / args.changed
    return {"nodes": args.nodes, "placements": args.placements, "changed": args.changed, "rounds": args.rounds,
            "assignments_per_node": round(read / (args.rounds * args.changed), 2),
            "statements_per_read": statistics.median(statements),
            "loop_cpu_ms_per_node": round(statistics.median(loop_cpu) * per_node, 4),
            "process_cpu_ms_per_node": round(statistics.median(process_cpu) * per_node, 4),
            "loop_cpu_ms_per_read_p50": round(statistics.median(loop_cpu) * 1000, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096, help=f"simulated nodes (a multiple of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=10000, help="running single-shard deployments on them")
    p.add_argument("--changed", type=int, default=32, help="nodes whose sets one read fetches (a commit's)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="reads first, not counted")
    p.add_argument("--seed", type=int, default=1, help="which nodes each round reads")
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
