"""`maiactl get deployments|deployment NAME|nodes|node ID|tenants|topology`."""
from __future__ import annotations

import argparse

from controller.cli.client import CliError, list_all
from controller.cli.context import Context
from controller.cli.views import (
    deployment_detail, deployments_table, node_detail, nodes_table, tenants_table, topology_view,
)
from maia.v1 import admin_pb2, deployments_pb2

# Accepted spellings of each resource, kubectl-style.
RESOURCES = {
    "deployments": "deployment", "deployment": "deployment", "deploy": "deployment",
    "nodes": "node", "node": "node",
    "tenants": "tenant", "tenant": "tenant",
    "topology": "topology",
}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("get", parents=[common], help="show deployments, nodes, tenants or the topology")
    p.add_argument("resource", choices=sorted(RESOURCES), metavar="RESOURCE",
                   help="deployments | deployment NAME | nodes | node ID | tenants | topology")
    p.add_argument("name", nargs="?", help="one object by name (lists all when absent)")
    p.add_argument("--tenant", help="deployments of one tenant only")
    p.add_argument("--rack", help="nodes of one rack only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    kind = RESOURCES[args.resource]
    if kind == "deployment":
        return _deployments(args, ctx)
    if kind == "node":
        return _nodes(args, ctx)
    if kind == "tenant":
        return _tenants(args, ctx)
    if args.name:
        raise CliError("get topology takes no name", 2)
    topology = ctx.controller.admin.GetTopology(admin_pb2.GetTopologyRequest(), timeout=ctx.rpc_timeout)
    ctx.emit_json(topology) if ctx.json else ctx.out(topology_view(topology))
    return 0


def _deployments(args: argparse.Namespace, ctx: Context) -> int:
    stub = ctx.controller.deployments
    if args.name:
        dep = stub.GetDeployment(deployments_pb2.GetDeploymentRequest(name=args.name), timeout=ctx.rpc_timeout)
        ctx.emit_json(dep) if ctx.json else ctx.out(deployment_detail(dep))
        return 0
    response = list_all(stub.ListDeployments, deployments_pb2.ListDeploymentsRequest(tenant=args.tenant or ""),
                        "deployments", timeout=ctx.rpc_timeout)
    deps = sorted(response.deployments, key=lambda d: d.spec.name)
    ctx.emit_json(response) if ctx.json else ctx.out(deployments_table(deps))
    return 0


def _nodes(args: argparse.Namespace, ctx: Context) -> int:
    admin = ctx.controller.admin
    if args.name:
        node = admin.GetNode(admin_pb2.GetNodeRequest(id=args.name), timeout=ctx.rpc_timeout)
        ctx.emit_json(node) if ctx.json else ctx.out(node_detail(node))
        return 0
    response = list_all(admin.ListNodes, admin_pb2.ListNodesRequest(rack=args.rack or ""), "nodes",
                        timeout=ctx.rpc_timeout)
    ctx.emit_json(response) if ctx.json else ctx.out(nodes_table(response.nodes))
    return 0


def _tenants(args: argparse.Namespace, ctx: Context) -> int:
    admin = ctx.controller.admin
    if args.name:
        tenant = admin.GetTenant(admin_pb2.GetTenantRequest(id=args.name), timeout=ctx.rpc_timeout)
        ctx.emit_json(tenant) if ctx.json else ctx.out(tenants_table([tenant]))
        return 0
    response = list_all(admin.ListTenants, admin_pb2.ListTenantsRequest(), "tenants", timeout=ctx.rpc_timeout)
    ctx.emit_json(response) if ctx.json else ctx.out(tenants_table(response.tenants))
    return 0
