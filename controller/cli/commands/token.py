"""`maiactl token create|list|revoke`: bearer tokens (admin only).

`token create` prints the secret alone on stdout (so `TOKEN=$(maiactl token create ...)` works;
with `-o json` an object whose `token` field is the secret); it is shown this once and never
stored by the controller. `token list` never shows secrets.
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime

from controller.cli.bounds import int_max
from controller.cli.client import CliError, Exit, list_all
from controller.cli.context import Context
from controller.cli.each import try_each
from controller.cli.refs import split_kind
from controller.cli.tables import render_table
from maia.v1 import admin_pb2

_TTL_RE = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ROLES = ("admin", "tenant", "node-bootstrap")
_TTL_MAX_S = int_max(admin_pb2.CreateTokenRequest.DESCRIPTOR.fields_by_name["ttl_seconds"])


def parse_ttl(text: str) -> int:
    """'90s', '30m', '24h', '7d' or plain seconds -> seconds."""
    match = _TTL_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30m, 24h or 7d, got {text!r}")
    ttl = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if ttl == 0:  # 0 is what the API reads as "never expires": not what `--ttl 0s` asks
        raise argparse.ArgumentTypeError(f"must be more than 0 (leave --ttl out for a token that never expires), "
                                         f"got {text!r}")
    if ttl > _TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"must be at most {_TTL_MAX_S} seconds, got {text!r}")
    return ttl


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("token", parents=[common], help="create, list and revoke bearer tokens (admin)")
    verbs = p.add_subparsers(dest="token_command", metavar="VERB", required=True)
    create = verbs.add_parser("create", parents=[common], help="create a token; prints its secret once")
    create.add_argument("--tenant", help="a tenant token bound to this tenant (implies --role tenant)")
    create.add_argument("--role", choices=ROLES, help="admin, tenant (needs --tenant) or node-bootstrap")
    create.add_argument("--ttl", type=parse_ttl, metavar="DURATION", help="expire after e.g. 30m, 24h, 7d "
                                                                          "(default: never)")
    create.add_argument("--name", help="a name for lists and the audit log")
    create.add_argument("--node", help="a node-bootstrap token that registers this node id only (implies --role "
                                       "node-bootstrap): one a host, so no host can claim another's node id")
    create.set_defaults(handler=run_create)
    listing = verbs.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    listing.add_argument("--role", choices=(*ROLES, "node"))
    listing.add_argument("--tenant")
    listing.set_defaults(handler=run_list)
    revoke = verbs.add_parser("revoke", parents=[common], help="revoke tokens at once")
    revoke.add_argument("ids", nargs="+", metavar="ID", help="a token's id, or token/ID as `token list -o name` prints it")
    revoke.set_defaults(handler=run_revoke)


def run_create(args: argparse.Namespace, ctx: Context) -> int:
    role = args.role or ("tenant" if args.tenant else "node-bootstrap" if args.node else None)
    if role is None:
        raise CliError("token create needs --tenant T, --node N or --role admin|node-bootstrap", Exit.USAGE)
    if args.node and role != "node-bootstrap":
        raise CliError(f"token create --node makes a node-bootstrap token, not {role}", Exit.USAGE)
    if role == "tenant" and not args.tenant:
        raise CliError("token create --role tenant needs --tenant T", Exit.USAGE)
    reply = ctx.controller.admin.CreateToken(
        admin_pb2.CreateTokenRequest(role=role, tenant=args.tenant or "", name=args.name or "",
                                     ttl_seconds=args.ttl or 0, node=args.node or ""), timeout=ctx.rpc_timeout)
    if args.node and reply.token.node != args.node:
        # A controller older than node-bound tokens drops the field and makes a token any host
        # could register any node with: never hand that out as the bound one asked for.
        ctx.controller.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=reply.token.id), timeout=ctx.rpc_timeout)
        raise CliError(f"the controller made token {reply.token.id} without binding it to node {args.node} (a "
                       f"release older than node-bound tokens?); it was revoked at once. Upgrade the controller, or "
                       f"use a node-bootstrap token without --node", Exit.FAILED)
    if ctx.json:
        ctx.emit_json({"token": reply.secret, **_token_dict(reply.token)})
        return 0
    ctx.out(reply.secret)
    expires = _when(reply.token, "expires_at") or "never"
    bound = reply.token.tenant or reply.token.node
    ctx.note(f"token {reply.token.id} ({reply.token.role}{' ' + bound if bound else ''}, "
             f"expires {expires}) created; its secret is shown only this once")
    return 0


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    reply = list_all(ctx.controller.admin.ListTokens,
                     admin_pb2.ListTokensRequest(role=args.role or "", tenant=args.tenant or ""), "tokens",
                     timeout=ctx.rpc_timeout)
    ctx.emit(lambda: {"tokens": [_token_dict(t) for t in reply.tokens]},
             lambda: render_table(
                 ("id", "name", "role", "tenant", "node", "created", "expires", "revoked"),
                 [(t.id, t.name, t.role, t.tenant, t.node, _when(t, "created_at"), _when(t, "expires_at"),
                   _when(t, "revoked_at")) for t in reply.tokens]),
             names=lambda: [f"token/{t.id}" for t in reply.tokens], is_table=True)
    return 0


def run_revoke(args: argparse.Namespace, ctx: Context) -> int:
    """Every ID is tried (`each`): one that fails leaves the others revoked all the same, and said."""
    # An ID, or the token/ID word `token list -o name` prints.
    ids = [named[1] if (named := split_kind(word, {"token": "token"})) else word for word in args.ids]

    def revoke(token_id: str) -> admin_pb2.Token:
        token = ctx.controller.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=token_id), timeout=ctx.rpc_timeout)
        if not ctx.json:
            ctx.out(f"token/{token.id} revoked")
        return token

    revoked, code = try_each(ids, revoke, ctx, lambda token_id: f"token/{token_id}")
    if ctx.json:
        ctx.emit_json({"tokens": [_token_dict(t) for t in revoked]})
    return code


def _when(token: admin_pb2.Token, field: str) -> str:
    if not token.HasField(field):
        return ""
    at: datetime = getattr(token, field).ToDatetime()
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _token_dict(token: admin_pb2.Token) -> dict[str, str]:
    doc = {"id": token.id, "name": token.name, "role": token.role}
    for key in ("tenant", "node", "created_by"):
        if getattr(token, key):
            doc[key] = getattr(token, key)
    for key in ("created_at", "expires_at", "revoked_at"):
        if token.HasField(key):
            doc[key] = _when(token, key)
    return doc
