"""`maiactl placements`: one table of every shard in the cluster."""
from __future__ import annotations

import argparse

from controller.cli.client import list_all
from controller.cli.context import Context
from controller.cli.vocab import shard_phase_word
from controller.cli.views import cluster_placements_table
from maia.v1 import deployments_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("placements", parents=[common], help="every placed shard in the cluster")
    p.add_argument("--tenant", help="one tenant only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    response = list_all(ctx.controller.deployments.ListDeployments,
                        deployments_pb2.ListDeploymentsRequest(tenant=args.tenant or ""), "deployments",
                        timeout=ctx.rpc_timeout)
    deps = list(response.deployments)
    if ctx.json:
        ctx.emit_json({"placements": [
            {"deployment": d.spec.name, "tenant": d.spec.tenant, "replica": p.replica, "shard": p.shard,
             "node": p.node, "rack": p.rack, "accelerator_indices": list(p.accelerator_indices),
             "accelerator_milli": p.accelerator_milli or 1000, "phase": shard_phase_word(p.phase)}
            for d in sorted(deps, key=lambda d: d.spec.name)
            for p in sorted(d.placements, key=lambda p: (p.replica, p.shard))]})
        return 0
    ctx.out(cluster_placements_table(deps))
    shards = sum(len(d.placements) for d in deps)
    placed = sum(1 for d in deps if d.placements)
    ctx.out(f"\n{shards} shards of {placed}/{len(deps)} deployments")
    return 0
