"""`maiactl describe deployment|node|tenant NAME`: everything about one object on one page.

deployment: spec, status, reasons, placements and its recent events; node: its resources,
state, the shards it holds and its recent events; tenant: its contract and usage, its
deployments and its recent events. `-o json|yaml` gives the same as one document.
"""
from __future__ import annotations

import argparse

from controller.cli.client import CliError, Exit, list_all
from controller.cli.commands.get import RESOURCES, fetch_events
from controller.cli.refs import add_tenant_flag, deployment_name, deployment_ref, kind_and_name
from controller.cli.context import Context
from controller.cli.documents import (
    deployment_document, event_document, node_document, placement_document, tenant_document,
)
from controller.cli.tables import fmt_indices, render_kv, render_table
from controller.cli.views import (
    deployment_detail, deployments_table, events_table, node_detail, phase_text, tenants_table,
)
from controller.cli.vocab import isolation_word, shard_phase_word, title
from maia.v1 import admin_pb2, deployments_pb2

RECENT_EVENTS = 15
KINDS = ("deployment", "node", "tenant")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("describe", parents=[common],
                       help="one deployment, node or tenant in full, with its recent events")
    p.add_argument("resource", metavar="KIND",
                   help="deployment | node | tenant; or KIND/NAME as -o name prints it (deployment/TENANT/NAME, "
                        "node/ID, tenant/ID) with no NAME after it")
    p.add_argument("name", metavar="NAME", nargs="?", help="deployments as NAME or TENANT/NAME")
    add_tenant_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    kind, args.name = kind_and_name("describe", [args.resource, *([] if args.name is None else [args.name])],
                                    {word: kind for word, kind in RESOURCES.items() if kind in KINDS})
    if args.tenant and kind != "deployment":
        raise CliError(f"describe {kind}: -n/--tenant applies to deployments only", Exit.USAGE)
    if kind == "deployment":
        ref = deployment_ref(args.name, args.tenant)
        dep = ctx.controller.deployments.GetDeployment(
            deployments_pb2.GetDeploymentRequest(name=ref.name, tenant=ref.tenant), timeout=ctx.rpc_timeout)
        # Its events under its resolved tenant (a bare NAME may have been resolved by the controller).
        events = fetch_events(ctx, kind, dep.spec.name, limit=RECENT_EVENTS, tenant=dep.spec.tenant)
        document, text = deployment_document(dep), deployment_detail(dep)
    else:  # the object first: what may not be read of it is said of it, not of its events
        document, text = _node(args.name, ctx) if kind == "node" else _tenant(args.name, ctx)
        events = fetch_events(ctx, kind, args.name, limit=RECENT_EVENTS)
    # Under `status` (the server's, which `apply -f` ignores): the document applies again as it is.
    document.setdefault("status", {})["events"] = [event_document(e) for e in events]
    ctx.emit(lambda: document, lambda: f"{text}\n\nEvents:\n{events_table(events, with_object=False)}",
             names=lambda: [deployment_name(dep.spec.tenant, dep.spec.name) if kind == "deployment"
                            else f"{kind}/{args.name}"])
    return Exit.OK


def _node(node_id: str, ctx: Context) -> tuple[dict, str]:
    node = ctx.controller.admin.GetNode(admin_pb2.GetNodeRequest(id=node_id), timeout=ctx.rpc_timeout)
    deps = list_all(ctx.controller.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(),
                    "deployments", timeout=ctx.rpc_timeout).deployments
    shards = sorted(((d, p) for d in deps for p in d.placements if p.node == node_id),
                    key=lambda dp: (dp[0].spec.name, dp[1].replica, dp[1].shard))
    document = node_document(node)
    document.setdefault("status", {})["shards"] = [
        {"deployment": d.spec.name, "tenant": d.spec.tenant, **placement_document(p)} for d, p in shards]
    table = render_table(["deployment", "tenant", "replica", "shard", "accelerators", "phase"],
                         [[d.spec.name, d.spec.tenant, p.replica, p.shard,
                           fmt_indices(p.accelerator_indices, p.accelerator_milli), title(shard_phase_word(p.phase))]
                          for d, p in shards], empty="(no shards)")
    return document, f"{node_detail(node)}\n\nShards:\n{table}"


def _tenant(tenant_id: str, ctx: Context) -> tuple[dict, str]:
    tenant = ctx.controller.admin.GetTenant(admin_pb2.GetTenantRequest(id=tenant_id), timeout=ctx.rpc_timeout)
    deps = sorted(list_all(ctx.controller.deployments.ListDeployments,
                           deployments_pb2.ListDeploymentsRequest(tenant=tenant_id), "deployments",
                           timeout=ctx.rpc_timeout).deployments,
        key=lambda d: d.spec.name)
    document = tenant_document(tenant)
    document.setdefault("status", {})["deployments"] = [
        {"name": d.spec.name, "phase": phase_text(d).lower(), "placed_replicas": d.placed_replicas,
         "replicas": d.spec.replicas} for d in deps]
    head = render_kv([("Tenant", tenant.id), ("Isolation", isolation_word(tenant.isolation))])
    text = f"{head}\n\n{tenants_table([tenant])}\n\nDeployments:\n{deployments_table(deps)}"
    return document, text
