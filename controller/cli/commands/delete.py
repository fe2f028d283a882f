"""`maiactl delete deployment NAME`, `maiactl delete tenant ID` and `maiactl delete node ID`."""
from __future__ import annotations

import argparse

from controller.cli.context import Context
from controller.cli.views import phase_text
from maia.v1 import admin_pb2, deployments_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("delete", parents=[common],
                       help="delete a deployment (its shards are stopped), a tenant, or a node (its shards move)")
    p.add_argument("resource", choices=("deployment", "deployments", "deploy", "tenant", "node"))
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(handler=run)


# Admin objects deleted by id: (method, request type, what is said after "deleted").
_ADMIN_DELETES = {
    "tenant": ("DeleteTenant", admin_pb2.DeleteTenantRequest, ""),
    "node": ("DeleteNode", admin_pb2.NodeRequest, " (its shards are placed again elsewhere)"),
}


def run(args: argparse.Namespace, ctx: Context) -> int:
    results = []
    for name in args.names:
        if args.resource in _ADMIN_DELETES:
            method, request, note = _ADMIN_DELETES[args.resource]
            getattr(ctx.controller.admin, method)(request(id=name), timeout=ctx.rpc_timeout)
            results.append({"object": f"{args.resource}/{name}", "action": "deleted"})
            if not ctx.json:
                ctx.out(f"{args.resource}/{name} deleted{note}")
            continue
        dep = ctx.controller.deployments.DeleteDeployment(
            deployments_pb2.DeleteDeploymentRequest(name=name), timeout=ctx.rpc_timeout)
        results.append({"object": f"deployment/{name}", "action": "deleted", "deployment": dep})
        if not ctx.json:
            ctx.out(f"deployment/{name} deleted (phase {phase_text(dep)})")
    if ctx.json:
        ctx.emit_json({"results": results})
    return 0
