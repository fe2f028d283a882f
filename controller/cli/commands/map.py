"""`maiactl map`: the racks drawn in the terminal (see `controller.cli.rackmap`).

Colour (one per tenant) on a terminal; plain text when stdout is not one, or with --plain.
`-o json|yaml` gives the topology and node documents it is drawn from.
"""
from __future__ import annotations

import argparse

from controller.cli.client import list_all
from controller.cli.context import Context
from controller.cli.documents import node_document, topology_document
from controller.cli.rackmap import render_map
from maia.v1 import admin_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("map", parents=[common],
                       help="racks and nodes drawn in the terminal: tenants, free accelerators, power")
    p.add_argument("--plain", action="store_true", help="no colour even on a terminal")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    admin = ctx.controller.admin
    topology = admin.GetTopology(admin_pb2.GetTopologyRequest(), timeout=ctx.rpc_timeout)
    nodes = list(list_all(admin.ListNodes, admin_pb2.ListNodesRequest(), "nodes", timeout=ctx.rpc_timeout).nodes)
    if ctx.json:
        ctx.emit_json({"topology": topology_document(topology), "nodes": [node_document(n) for n in nodes]})
        return 0
    if ctx.stdout.isatty() and not args.plain:
        from rich.console import Console

        Console(file=ctx.stdout, highlight=False, soft_wrap=True).print(render_map(topology, nodes, colour=True))
    else:
        ctx.out(render_map(topology, nodes))
    return 0
