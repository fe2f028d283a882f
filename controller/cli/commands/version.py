"""`maiactl version [--client]`: this client's release and the controller's (AdminService.GetVersion).

Asking the controller needs the connection settings, so a config error (an unknown context, a
token file that cannot be read) is reported as by every other command (exit 2) rather than
ignored for the defaults, which would call another controller than the one asked for.
`--client` calls nothing and works without a usable config. The controller says where it
serves and whether it leads, or where the leader is (with several controllers, `--controller
A,B,C`, whichever answered).
"""
from __future__ import annotations

import argparse

import grpc

from controller.cli.client import Exit, exit_code_of, rpc_error_text
from controller.cli.context import Context
from controller.version import version_text
from maia.v1 import admin_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("version", parents=[common], help="client and controller versions")
    p.add_argument("--client", action="store_true", help="this client only (no call; needs no usable config)")
    p.set_defaults(handler=run, offline=_client_only)


def _client_only(args: argparse.Namespace) -> bool:
    return bool(args.client)


def run(args: argparse.Namespace, ctx: Context) -> int:
    client = {"version": version_text()}
    server: dict[str, str | bool] | None = None
    error: grpc.RpcError | None = None
    if not args.client:
        try:
            info = ctx.controller.admin.GetVersion(admin_pb2.GetVersionRequest(), timeout=ctx.rpc_timeout)
            server = {"version": info.version, "schema_revision": info.schema_revision,
                      "database_revision": info.database_revision,
                      "address": info.address or ctx.address, "leader": info.leader,
                      "leader_address": info.leader_address}
        except grpc.RpcError as exc:
            error = exc
    if ctx.json:
        ctx.emit_json({"client": client, "server": server})
    else:
        ctx.out(f"Client: maiactl {client['version']}")
        if server is not None:
            # The database's own revision where it is not the controller's (a roll: migrated or
            # downgraded under it); "(schema X)" alone read as the database's.
            database = server["database_revision"]
            moved = f"; the database is at {database}" if database and database != server["schema_revision"] else ""
            ctx.out(f"Server: maia-controller {server['version']} (schema {server['schema_revision']}{moved}) "
                    f"at {server['address']}, {_role(server)}")
    if error is not None:
        ctx.note(rpc_error_text(error, ctx.address))
        return exit_code_of(error)
    return Exit.OK


def _role(server: dict[str, str | bool]) -> str:
    """'leader', or 'follower (leader at ADDRESS)' ('no leader now' while none holds the lease)."""
    if server["leader"]:
        return "leader"
    return f"follower (leader at {server['leader_address']})" if server["leader_address"] else "follower (no leader now)"
