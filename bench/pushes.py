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
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import update

from bench.e2e import NODES_PER_RACK, Shape
from bench.preload import preload, preload_tenants
from controller.agents import AgentHub
from controller.identity import Principal
from controller.store import models as m
from controller.store.db import Database

ADMIN = Principal("bench")


async def _idle() -> AsyncIterator:
    await asyncio.Event().wait()
    yield  # never reached


async def run(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="maia-bench-pushes-") as root:
        url = f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}"
        layout = Shape(args.nodes, 1, args.placements).layout()
        await preload(url, layout, placements=args.placements, tenants=preload_tenants(args.placements), nodes_up=True)
        db = Database(url)
        async with db.unit_of_work() as uow:  # the session each node's agent would hello with
            await uow.session.execute(update(m.Node).values(session_id=m.Node.id))
            await uow.commit()
        hub = AgentHub(db, heartbeat_timeout_s=3600, on_liveness_change=lambda: None,
                       on_deployments_changed=lambda keys: asyncio.sleep(0))
        nodes = [n.node_id for n in layout.nodes()]
        received = dict.fromkeys(nodes, 0)

        async def agent(node_id: str) -> None:
            async for _ in hub.converse(ADMIN, node_id, node_id, _idle()):
                received[node_id] += 1

        async def until(count: int, among: list[str]) -> None:
            while any(received[n] < count for n in among):
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(agent(n)) for n in nodes]
        try:
            await until(1, nodes)
            changed = nodes[::max(1, len(nodes) // args.changed)][:args.changed]
            walls, cpus = [], []
            for i in range(args.rounds):
                wall, cpu = time.perf_counter(), time.process_time()
                hub.notify(changed)
                await until(i + 2, changed)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        finally:
            hub.close_all()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await db.dispose()
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
