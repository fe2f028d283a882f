"""Assignment pushes after a commit: what it costs the controller to send every changed node its set.

In process, no gRPC and no agents: a database preloaded (`bench.preload`) with `--nodes` nodes
holding `--placements` running shards, one `AgentHub` with a Connect conversation open for every
node (an idle inbound stream), then `--rounds` times a commit's worth of `notify` for
`--changed` nodes, timed until every one of them got its set: wall time and the process's CPU
time (the database driver's thread included). It needs nothing but the hub's public calls, so it
runs against an older tree too (`PYTHONPATH=<old tree>:<old tree>/proto python bench/pushes.py`),
which is how the "before" numbers in docs/benchmarks.md were taken.

    python -m bench.pushes --nodes 4096 --placements 10000 --changed 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import update

from bench.e2e import NODES_PER_RACK, Shape
from bench.preload import preload
from controller.agents import AgentHub
from controller.errors import MaiaError
from controller.identity import Principal
from controller.store import models as m
from controller.store.db import Database
from controller.domain.values import AssignmentSet

ADMIN = Principal("bench")


async def _idle(node_id: str, sets: list[AssignmentSet]) -> AsyncIterator:
    await asyncio.Event().wait()
    yield  # never reached


Inbound = Callable[[str, list[AssignmentSet]], AsyncIterator]


@asynccontextmanager
async def conversations(nodes: int, placements: int, inbound: Inbound = _idle, *, heartbeat_timeout_s: float = 3600,
                        ) -> AsyncIterator[tuple[AgentHub, dict[str, list[AssignmentSet]]]]:
    """A preloaded SQLite cluster and a hub with a Connect conversation open for every node
    (`inbound(node, the sets it received so far)` is what its agent says); yields the hub and
    the sets each node received, once every node got its first."""
    with tempfile.TemporaryDirectory(prefix="maia-bench-pushes-") as root:
        url = f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}"
        layout = Shape(nodes, 1, placements).layout()
        await preload(url, layout, placements=placements, tenants=["bench"], nodes_up=True)
        db = Database(url)
        async with db.unit_of_work() as uow:  # the session each node's agent would hello with
            await uow.session.execute(update(m.Node).values(session_id=m.Node.id))
            await uow.commit()
        hub = AgentHub(db, heartbeat_timeout_s=heartbeat_timeout_s, on_liveness_change=lambda: None,
                       on_deployments_changed=lambda keys: asyncio.sleep(0))
        received: dict[str, list[AssignmentSet]] = {n.node_id: [] for n in layout.nodes()}

        async def agent(node_id: str) -> None:
            # A hello the admission gate refused (a thousand at once) is retried, as agents do, and
            # so is a conversation the hub ended (silent past a short heartbeat timeout on a loaded
            # machine): a node left without one would never get its first set.
            while True:
                try:
                    async for current in hub.converse(ADMIN, node_id, node_id, inbound(node_id, received[node_id])):
                        received[node_id].append(current)
                except MaiaError:
                    pass
                await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(agent(n)) for n in received]
        try:
            await until(received, 1, list(received))
            yield hub, received
        finally:
            hub.close_all()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await db.dispose()


async def until(received: dict[str, list[AssignmentSet]], count: int, among: list[str],
                timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(len(received[n]) < count for n in among):
        if time.monotonic() > deadline:
            short = [n for n in among if len(received[n]) < count]
            raise TimeoutError(f"{len(short)} nodes got fewer than {count} assignment sets in {timeout_s:.0f} s: "
                               f"{short[:5]}")
        await asyncio.sleep(0.001)


async def run(args: argparse.Namespace) -> dict[str, float]:
    async with conversations(args.nodes, args.placements) as (hub, received):
        nodes = list(received)
        changed = nodes[::max(1, len(nodes) // args.changed)][:args.changed]
        walls, cpus = [], []
        for i in range(args.rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            hub.notify(changed)
            await until(received, i + 2, changed)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {"nodes": args.nodes, "placements": args.placements, "changed": len(changed), "rounds": args.rounds,
            "wall_ms_p50": round(statistics.median(walls) * 1000, 1),
            "cpu_ms_p50": round(statistics.median(cpus) * 1000, 1),
            "cpu_ms_per_node": round(statistics.median(cpus) * 1000 / len(changed), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1024, help=f"simulated nodes (a multiple of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=2500, help="running single-shard deployments on them")
    p.add_argument("--changed", type=int, default=512, help="nodes a commit changed (notified each round)")
    p.add_argument("--rounds", type=int, default=5)
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
