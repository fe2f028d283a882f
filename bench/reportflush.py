"""The agents' report flush alone: the controller's CPU per shard report that changes a shard.

In process, no gRPC and no hub: a database preloaded (`bench.preload`) with `--nodes` nodes
holding `--placements` running single-shard deployments, then `--rounds` flushes as the hub
writes one chunk (`usecases.agents.flush_reports` in a unit of work of its own, the views of the
deployments it changed asked for, as the hub asks for them to publish): each of `--reports`
reports from random shards that moves its shard between LOADING and RUNNING (as a new
deployment's shard does twice), with a heartbeat from each reporting node. Per flush: the event
loop thread's CPU (`time.thread_time`: the ORM, building the views) and the process's (the
database driver's thread with SQLite too), and the statements sent; the figures are medians per
report. Counts, not latencies: steadier on a shared machine. To run it against an older
tree, copy bench/assignments.py and bench/reportflush.py into that tree's bench/ (they need only
`repo.assignment_sets` and `usecases.agents.flush_reports`, which older trees have) and run it there.

    python -m bench.reportflush --nodes 4096 --placements 10000 --reports 64 --rounds 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.assignments import Measured, preloaded
from bench.e2e import NODES_PER_RACK
from bench.selfprofile import recording
from controller.domain.values import DeploymentView, ShardReport
from controller.store import models as m
from controller.store.db import Database
from controller.usecases.agents import NodeBeat, flush_reports

PHASES = ("loading", "running")


async def _shards(db: Database) -> list[tuple[str, str, str, int]]:
    """(node, tenant, deployment, generation) of every preloaded shard."""
    async with db.unit_of_work() as uow:
        rows = await uow.session.execute(
            select(m.Placement.node_id, m.Deployment.tenant_id, m.Deployment.name, m.Placement.generation)
            .join(m.Deployment).order_by(m.Placement.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with preloaded(args.nodes, args.placements, "maia-bench-reportflush-") as (db, _):
        shards = await _shards(db)
        said = [1] * len(shards)  # the index in PHASES each shard is in (the preload's: RUNNING)
        measured = Measured(db)
        pick = random.Random(args.seed)
        changed = 0

        async def flush_once(counted: bool) -> int:
            """One flush of `--reports` reports; the views it published."""
            reports = []
            for index in pick.sample(range(len(shards)), args.reports):
                node_id, tenant, name, generation = shards[index]
                said[index] = 1 - said[index]
                reports.append((node_id, ShardReport(name, 0, 0, generation, PHASES[said[index]], tenant=tenant)))
            now = datetime.now(timezone.utc)
            beats = {node_id: NodeBeat(now, 700.0) for node_id, _ in reports}
            views: dict[str, DeploymentView] = {}
            with measured.call(counted):
                async with db.unit_of_work() as uow:
                    await flush_reports(uow, beats, reports, views=views)
            return len(views)

        for _ in range(args.warmup):
            await flush_once(False)
        async with recording(args.py_spy, Path(f"reportflush-{args.reports}.pyspy.txt"), rate_hz=250):
            for _ in range(args.rounds):
                changed += await flush_once(True)
    return {"nodes": args.nodes, "placements": args.placements, "reports": args.reports, "rounds": args.rounds,
            "views_per_flush": round(changed / args.rounds, 1), **measured.figures("flush", "report", args.reports)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096, help=f"simulated nodes (a multiple of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=10000, help="running single-shard deployments on them")
    p.add_argument("--reports", type=int, default=64, help="shard reports per flush, each changing its shard")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10, help="flushes first, not counted")
    p.add_argument("--seed", type=int, default=1, help="which shards each flush's reports name")
    p.add_argument("--py-spy", metavar="PATH", help="record the measured flushes with this py-spy binary "
                                                   "(reportflush-N.pyspy.txt in the current directory)")
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
