"""Steady-state heartbeats: the controller's CPU per heartbeat, the hub and its flushes alone.

In process, no gRPC (`bench.pushes.conversations`: a preloaded SQLite cluster, one Connect
conversation per node on an `AgentHub`): every node's agent sends, every `--interval` seconds, a
heartbeat carrying the full state of the shards it was given (all RUNNING, as the preload wrote
them), while the hub's flush loop runs. After `--warmup` seconds (every node's first heartbeat
is written in full), the process's CPU time (the database driver's thread included) over
`--seconds`, divided by the heartbeats sent. The hub's heartbeat timeout is three intervals, as
the controller's default ratio. The agents' side (a prebuilt heartbeat per node and
a sleep) is in the figure too, alike before and after. Runs against an older tree as
`bench.pushes` does.

    python -m bench.heartbeats --nodes 1024 --placements 2500 --interval 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import AsyncIterator

from bench.pushes import conversations
from controller.domain.values import AssignmentSet, HeartbeatReport, ShardReport


async def run(args: argparse.Namespace) -> dict[str, float]:
    sent = 0

    async def beating(node_id: str, sets: list[AssignmentSet]) -> AsyncIterator[HeartbeatReport]:
        nonlocal sent
        while not sets:
            await asyncio.sleep(0.05)
        shards = tuple(ShardReport(a.deployment, a.replica, a.shard, a.generation, "running", tenant=a.tenant)
                       for a in sets[0].assignments)
        await asyncio.sleep(random.uniform(0, args.interval))  # spread over the interval
        seq = 0
        while True:
            seq += 1
            yield HeartbeatReport(seq, 500.0 + 100 * len(shards), shards)
            sent += 1
            await asyncio.sleep(args.interval)

    # The controller's ratio: agents heartbeat every third of the timeout.
    async with conversations(args.nodes, args.placements, beating, heartbeat_timeout_s=3 * args.interval) as (hub, _):
        flushing = asyncio.create_task(hub.run())
        try:
            await asyncio.sleep(args.warmup)
            beats, cpu, wall = sent, time.process_time(), time.perf_counter()
            await asyncio.sleep(args.seconds)
            beats, cpu, wall = sent - beats, time.process_time() - cpu, time.perf_counter() - wall
        finally:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
    return {"nodes": args.nodes, "placements": args.placements, "interval_s": args.interval,
            "heartbeats_per_s": round(beats / wall), "cpu_share": round(cpu / wall, 3),
            "cpu_ms_per_heartbeat": round(cpu * 1000 / max(1, beats), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1024, help="simulated nodes (a multiple of 16)")
    p.add_argument("--placements", type=int, default=2500, help="running single-shard deployments on them")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between one node's heartbeats")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
