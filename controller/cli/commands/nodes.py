"""`maiactl cordon|uncordon|drain NODE...` and `maiactl node reset-credential NODE...`.

`drain --wait` then waits (progress bars on a terminal) until every deployment that had a shard
on the drained nodes runs again elsewhere, or stops early when one is blocked for good.
"""
from __future__ import annotations

import argparse

from controller.cli.client import list_all
from controller.cli.context import Context
from controller.cli.vocab import node_state_word
from controller.cli.commands.wait import wait_deployments
from maia.v1 import admin_pb2, deployments_pb2

_VERBS = {"cordon": ("CordonNode", "cordoned"), "uncordon": ("UncordonNode", "uncordoned"),
          "drain": ("DrainNode", "drained")}
_HELP = {"cordon": "take no new shards on a node", "uncordon": "let a node take new shards again",
         "drain": "cordon a node and place its shards elsewhere"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for verb in _VERBS:
        p = sub.add_parser(verb, parents=[common], help=_HELP[verb])
        p.add_argument("nodes", nargs="+", metavar="NODE")
        if verb == "drain":
            p.add_argument("--wait", action="store_true",
                           help="block until the deployments that had shards there run again elsewhere")
            p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                           help="--wait gives up after this many seconds (default: 300)")
        p.set_defaults(handler=run, verb=verb)
    node = sub.add_parser("node", parents=[common], help="node credentials (admin)")
    verbs = node.add_subparsers(dest="node_command", metavar="VERB", required=True)
    reset = verbs.add_parser("reset-credential", parents=[common],
                             help="revoke a node's credential; its agent registers again with a node-bootstrap token")
    reset.add_argument("nodes", nargs="+", metavar="NODE")
    reset.set_defaults(handler=run_reset_credential)


def run_reset_credential(args: argparse.Namespace, ctx: Context) -> int:
    replies = []
    for node_id in args.nodes:
        reply = ctx.controller.admin.ResetNodeCredential(admin_pb2.NodeRequest(id=node_id), timeout=ctx.rpc_timeout)
        replies.append(reply)
        if not ctx.json:
            ctx.out(f"node/{node_id} credential reset ({len(reply.revoked_token_ids)} revoked); "
                    "its agent may register again with a node-bootstrap token")
    if ctx.json:
        ctx.emit_json({"nodes": replies})
    return 0


def run(args: argparse.Namespace, ctx: Context) -> int:
    method, past = _VERBS[args.verb]
    call = getattr(ctx.controller.admin, method)
    moving: list[str] = []
    if getattr(args, "wait", False):
        listed = list_all(ctx.controller.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(),
                          "deployments", timeout=ctx.rpc_timeout).deployments
        moving = sorted({d.spec.name for d in listed for p in d.placements if p.node in args.nodes})
    nodes = []
    for node_id in args.nodes:
        node = call(admin_pb2.NodeRequest(id=node_id), timeout=ctx.rpc_timeout)
        nodes.append(node)
        if not ctx.json:
            ctx.out(f"node/{node_id} {past} (state {node_state_word(node.state)}, {node.shards} shards)")
    if ctx.json and not moving:  # with --wait, the one document is the deployments waited for
        ctx.emit_json({"nodes": nodes})
    if moving:
        return wait_deployments(moving, "running", args.timeout, ctx)
    return 0
