"""`maiactl snapshot`: the committed cluster state as a placement problem document (admin only).

`-o json` (or yaml) prints the interchange-format problem (version 1, see shared/placement/)
with every committed placement, exactly as the reconciler hands it to the solver: feed it to
`maiactl solve` to see what the solver would do now, or to the independent plan checker. The
table output says what the document holds.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from controller.cli.context import Context
from maia.v1 import admin_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("snapshot", parents=[common],
                       help="the committed state as a placement problem document (-o json for the document)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    reply = ctx.controller.admin.GetClusterSnapshot(admin_pb2.GetClusterSnapshotRequest(), timeout=ctx.rpc_timeout)
    problem = json.loads(reply.problem_json)
    ctx.emit(lambda: problem, lambda: _summary(problem, reply.generation))
    return 0


def _summary(problem: dict[str, Any], generation: int) -> str:
    states = Counter(n.get("state", "ready") for n in problem.get("nodes", ()))
    return "\n".join([
        f"Generation:   {generation}",
        f"Nodes:        {len(problem.get('nodes', ()))} ("
        + ", ".join(f"{count} {state}" for state, count in sorted(states.items())) + ")",
        f"Tenants:      {len(problem.get('tenants', ()))}",
        f"Deployments:  {len(problem.get('deployments', ()))}",
        f"Placements:   {len(problem.get('placements', ()))}",
        "(-o json prints the problem document: maiactl solve reads it)",
    ])
