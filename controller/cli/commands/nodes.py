"""`maiactl cordon|uncordon|drain NODE...` and `maiactl node reset-credential NODE...`.

A drain is make-before-break: each replica on the node keeps running until its replacement
runs elsewhere. `drain --wait` follows it (progress on stderr) until no deployment that had a
shard there has a replica left to replace, then prints what moved where, shard by shard
(`from -> to`); on --timeout it exits 1 with what is still waiting and why. A NODE may be given
as `-o name` prints it (`node/ID`), or after the word `node` (`drain node n1 n2`).
"""
from __future__ import annotations

import argparse

from controller.cli.bounds import seconds
from controller.cli.client import CliError, Exit, list_all
from controller.cli.context import Context
from controller.cli.each import try_each
from controller.cli.documents import node_document
from controller.cli.refs import NODE_WORDS, deployment_ref, kind_and_names
from controller.cli.vocab import node_state_word
from controller.cli.commands.wait import wait_deployments
from maia.v1 import admin_pb2, deployments_pb2

_VERBS = {"cordon": ("CordonNode", "cordoned"), "uncordon": ("UncordonNode", "uncordoned"),
          "drain": ("DrainNode", "draining")}  # drained once its replicas run elsewhere (--wait says so)
_HELP = {"cordon": "take no new shards on a node", "uncordon": "let a node take new shards again",
         "drain": "cordon a node and replace its shards elsewhere (make-before-break)"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for verb in _VERBS:
        p = sub.add_parser(verb, parents=[common], help=_HELP[verb])
        _add_nodes(p)
        if verb == "drain":
            p.add_argument("--wait", action="store_true",
                           help="block until the replicas there run elsewhere, then show what moved where")
            p.add_argument("--timeout", type=seconds(), default=300.0, metavar="SECONDS",
                           help="--wait gives up after this many seconds (default: 300)")
        p.set_defaults(handler=run, verb=verb)
    node = sub.add_parser("node", parents=[common], help="node credentials (admin)")
    verbs = node.add_subparsers(dest="node_command", metavar="VERB", required=True)
    reset = verbs.add_parser("reset-credential", parents=[common],
                             help="revoke a node's credential; its agent registers again with a node-bootstrap token")
    _add_nodes(reset)
    reset.set_defaults(handler=run_reset_credential, verb="node reset-credential")


def _add_nodes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="node IDs, or node/ID as -o name prints them")


def _node_ids(args: argparse.Namespace) -> list[str]:
    """The IDs of the NODE words: `ID`, `node/ID` or `node ID...`."""
    ids = kind_and_names(args.verb, args.nodes, NODE_WORDS, default="node")[1]
    if not ids:
        raise CliError(f"{args.verb} needs a NODE", Exit.USAGE)
    return ids


def run_reset_credential(args: argparse.Namespace, ctx: Context) -> int:
    def reset(node_id: str) -> admin_pb2.ResetNodeCredentialResponse:
        reply = ctx.controller.admin.ResetNodeCredential(admin_pb2.NodeRequest(id=node_id), timeout=ctx.rpc_timeout)
        if not ctx.json:
            ctx.out(f"node/{node_id} credential reset ({len(reply.revoked_token_ids)} revoked); "
                    "its agent may register again with a node-bootstrap token")
        return reply

    replies, code = try_each(_node_ids(args), reset, ctx, lambda node_id: f"node/{node_id}")
    if ctx.json:
        ctx.emit_json({"nodes": replies})
    return code


def run(args: argparse.Namespace, ctx: Context) -> int:
    method, past = _VERBS[args.verb]
    args.nodes = _node_ids(args)
    call = getattr(ctx.controller.admin, method)
    before: dict[str, list[deployments_pb2.ShardPlacement]] = {}
    if getattr(args, "wait", False):
        listed = list_all(ctx.controller.deployments.ListDeployments, deployments_pb2.ListDeploymentsRequest(),
                          "deployments", timeout=ctx.rpc_timeout).deployments
        # By TENANT/NAME: two tenants' deployments of one name may both have shards there.
        before = {f"{d.spec.tenant}/{d.spec.name}": list(d.placements)
                  for d in listed if any(p.node in args.nodes for p in d.placements)}
    def act(node_id: str) -> admin_pb2.Node:
        node = call(admin_pb2.NodeRequest(id=node_id), timeout=ctx.rpc_timeout)
        if ctx.output == "name":  # as `get nodes -o name` prints them, for a script to read back
            ctx.out(f"node/{node_id}")
        elif not ctx.json:
            ctx.out(f"node/{node_id} {past} (state {node_state_word(node.state)}, {node.shards} shards)")
        return node

    nodes, code = try_each(args.nodes, act, ctx, lambda node_id: f"node/{node_id}")
    drained = {n.id for n in nodes}  # one that failed (a typo among them) leaves the others waited for
    before = {key: placements for key, placements in before.items() if any(p.node in drained for p in placements)}
    if not before:
        if ctx.json:
            ctx.emit_json({"nodes": [node_document(n) for n in nodes]})
        return code
    wait_deployments(sorted(before), "replaced", args.timeout, ctx, fail_fast=False, quiet=True)
    moves = [move for key in sorted(before) for move in drain_moves(key, before[key], _placements(ctx, key), drained)]
    if ctx.json:
        ctx.emit_json({"nodes": [node_document(n) for n in nodes], "moved": moves})
        return code
    if ctx.output == "name":  # the nodes' names were printed: the moves are no names
        return code
    ctx.out(f"drained {', '.join(n for n in args.nodes if n in drained)}: {len(moves)} shard(s) moved")
    for m in moves:
        ctx.out(f"  {m['deployment']} replica {m['from_replica']} shard {m['shard']}: {m['from']} -> {m['to']}"
                f" (now replica {m['to_replica']})")
    return code


def _placements(ctx: Context, key: str) -> list[deployments_pb2.ShardPlacement]:
    ref = deployment_ref(key, None)
    return list(ctx.controller.deployments.GetDeployment(
        deployments_pb2.GetDeploymentRequest(name=ref.name, tenant=ref.tenant), timeout=ctx.rpc_timeout).placements)


def drain_moves(name: str, before: list[deployments_pb2.ShardPlacement], after: list[deployments_pb2.ShardPlacement],
                drained: set[str]) -> list[dict[str, object]]:
    """Which replica replaced which: the replicas that were on the drained nodes, paired in order
    with the replicas that are new since, shard by shard (from -> to). A replica is new when its
    number was not placed before or its shards are elsewhere now: the controller gives a new
    replica the lowest number free, which may be one the drain has just freed."""
    old_replicas = sorted({p.replica for p in before if p.node in drained})
    shards_before = {(p.replica, p.shard): p.node for p in before}
    shards_after = {(p.replica, p.shard): p.node for p in after}

    def where(shards: dict[tuple[int, int], str], replica: int) -> dict[int, str]:
        return {shard: node for (r, shard), node in shards.items() if r == replica}

    new_replicas = sorted(r for r in {p.replica for p in after}
                          if where(shards_after, r) != where(shards_before, r))
    moves = []
    for old, new in zip(old_replicas, new_replicas):
        for (replica, shard), node in sorted(shards_before.items()):
            if replica == old:
                moves.append({"deployment": name, "shard": shard, "from_replica": old, "from": node,
                              "to_replica": new, "to": shards_after.get((new, shard), "?")})
    return moves
