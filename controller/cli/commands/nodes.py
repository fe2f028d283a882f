"""`maiactl cordon|uncordon|drain NODE...`."""
from __future__ import annotations

import argparse

from controller.cli.context import Context
from controller.cli.vocab import node_state_word
from maia.v1 import admin_pb2

_VERBS = {"cordon": ("CordonNode", "cordoned"), "uncordon": ("UncordonNode", "uncordoned"),
          "drain": ("DrainNode", "drained")}
_HELP = {"cordon": "take no new shards on a node", "uncordon": "let a node take new shards again",
         "drain": "cordon a node and place its shards elsewhere"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for verb in _VERBS:
        p = sub.add_parser(verb, parents=[common], help=_HELP[verb])
        p.add_argument("nodes", nargs="+", metavar="NODE")
        p.set_defaults(handler=run, verb=verb)


def run(args: argparse.Namespace, ctx: Context) -> int:
    method, past = _VERBS[args.verb]
    call = getattr(ctx.controller.admin, method)
    nodes = []
    for node_id in args.nodes:
        node = call(admin_pb2.NodeRequest(id=node_id), timeout=ctx.rpc_timeout)
        nodes.append(node)
        if not ctx.json:
            ctx.out(f"node/{node_id} {past} (state {node_state_word(node.state)}, {node.shards} shards)")
    if ctx.json:
        ctx.emit_json({"nodes": nodes})
    return 0
