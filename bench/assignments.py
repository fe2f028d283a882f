"""Assignment-set reads alone: the controller's CPU per node whose set a commit changed.

In process, no gRPC and no hub: a database preloaded (`bench.preload`) with `--nodes` nodes
holding `--placements` running single-shard deployments, then `--rounds` reads of the sets of
`--changed` random nodes, each as the hub reads a commit's changed nodes (`repo.assignment_sets`
in a unit of work of its own). Per round: the event loop thread's CPU (`time.thread_time`: the
ORM, the row processing, building the sets) and the process's (the database driver's thread
with SQLite itself too), the statements sent and the assignments read; the figures are medians
per node read. Counts, not latencies: steadier on a shared machine. To run it against an older
tree, copy bench/assignments.py and bench/reportflush.py into that tree's bench/ (they need only
`repo.assignment_sets` and `usecases.agents.flush_reports`, which older trees have) and run it there.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bench.e2e import NODES_PER_RACK, Shape
from bench.preload import Layout, preload
from controller.store import repositories as repo
from controller.store.db import Database


@asynccontextmanager
async def preloaded(nodes: int, placements: int, prefix: str) -> AsyncIterator[tuple[Database, Layout]]:
    """A SQLite database in a temporary directory, preloaded (`bench.preload`: nodes up, running
    single-shard deployments), and its `Database`, disposed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as root:
        url = f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}"
        layout = Shape(nodes, 1, placements).layout()
        await preload(url, layout, placements=placements, tenants=["bench"], nodes_up=True)
        db = Database(url)
        try:
            yield db, layout
        finally:
            await db.dispose()


class Measured:
    """What the calls measured on one database cost, each: the event loop thread's CPU
    (`time.thread_time`), the process's (`time.process_time`: the database driver's thread and
    SQLite too) and the statements sent."""

    def __init__(self, db: Database) -> None:
        self.loop_cpu: list[float] = []
        self.process_cpu: list[float] = []
        self.statements: list[int] = []
        self._sent = 0
        event.listen(db.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, *_args: Any) -> None:
        self._sent += 1

    @contextmanager
    def call(self, counted: bool = True) -> Iterator[None]:
        """Measure the block as one call (`counted` False: a warm-up, not kept)."""
        sent, thread, process = self._sent, time.thread_time(), time.process_time()
        yield
        if counted:
            self.loop_cpu.append(time.thread_time() - thread)
            self.process_cpu.append(time.process_time() - process)
            self.statements.append(self._sent - sent)

    def figures(self, call: str, unit: str, units_per_call: int) -> dict[str, Any]:
        """Medians: statements per call, CPU per `unit` (`units_per_call` in each call) and per call."""
        per_unit = 1000 / units_per_call
        return {f"statements_per_{call}": statistics.median(self.statements),
                f"loop_cpu_ms_per_{unit}": round(statistics.median(self.loop_cpu) * per_unit, 4),
                f"process_cpu_ms_per_{unit}": round(statistics.median(self.process_cpu) * per_unit, 4),
                f"loop_cpu_ms_per_{call}_p50": round(statistics.median(self.loop_cpu) * 1000, 3)}


def main_by_cluster_size(doc: str, run: Callable[[argparse.Namespace, int], Awaitable[dict[str, Any]]], *,
                         nodes: list[int], placements: int, rounds: int, warmup: int, counted: str) -> None:
    """The `main` of an in-process benchmark measured once per cluster size (`bench.capacity`,
    `console`, `snapshot`): `--nodes` (several), `--placements`, `--rounds` and `--warmup` (`counted`:
    what it measures, for the help) with these defaults; `run(args, nodes)`'s figures, one JSON line
    a size."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=nodes,
                   help=f"simulated nodes (multiples of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=placements, help="running single-shard deployments on them")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--warmup", type=int, default=warmup, help=f"{counted} first, not counted")
    args = p.parse_args()
    for size in args.nodes:
        print(json.dumps(asyncio.run(run(args, size))))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with preloaded(args.nodes, args.placements, "maia-bench-assignments-") as (db, layout):
        nodes = [n.node_id for n in layout.nodes()]
        measured = Measured(db)
        pick = random.Random(args.seed)
        read = 0
        for i in range(args.warmup + args.rounds):
            changed = pick.sample(nodes, args.changed)
            with measured.call(counted=i >= args.warmup):
                async with db.unit_of_work() as uow:
                    sets = await repo.assignment_sets(uow.session, changed)
            if i >= args.warmup:
                read += sum(len(s.assignments) for s in sets.values())
    return {"nodes": args.nodes, "placements": args.placements, "changed": args.changed, "rounds": args.rounds,
            "assignments_per_node": round(read / (args.rounds * args.changed), 2),
            **measured.figures("read", "node", args.changed)}


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
