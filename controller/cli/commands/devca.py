"""`maiactl dev-ca --dir DIR [--server-name NAME]... [--node ID]... [--client NAME]...`.

Makes (or reuses) a development CA in DIR and issues the controller's certificate and client
certificates for node agents and tools; prints what to pass to whom. For local trials and tests:
production certificates come from the operator's own PKI. A directory that cannot be written, a
CA there that cannot be read, or a node id or client name that cannot be a certificate's common
name or name its file is a usage error (exit 2), found before anything is written where it can be.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from controller.cli.client import CliError, Exit
from controller.cli.context import Context

if TYPE_CHECKING:
    from controller.devca import Issued


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("dev-ca", parents=[common], help="make a development CA, server and client certificates")
    p.add_argument("--dir", type=Path, required=True, help="where the CA and certificates go (the CA is reused)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="a host name or IP address of the controller (repeatable; default: localhost, "
                        "127.0.0.1, ::1)")
    p.add_argument("--node", action="append", default=[], metavar="ID",
                   help="issue node-ID.pem for the node agent of node ID (repeatable)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="issue client-NAME.pem for maiactl or another tool (repeatable)")
    p.set_defaults(handler=run, offline=True)


def run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        issued, server = _issue(args)
    except OSError as exc:
        raise CliError(f"dev-ca: {exc.filename or args.dir}: {exc.strerror or exc}", Exit.USAGE) from None
    except ValueError as exc:  # a name, or a CA in --dir that is not one this tool made
        raise CliError(f"dev-ca: {exc}", Exit.USAGE) from None
    if ctx.json:
        ctx.emit_json({"issued": issued})
        return Exit.OK
    ctx.out("\n".join(f"{what}: {path}" for what, path in issued.items()))
    ctx.out(f"\ncontroller: maia-controller --tls-cert {server.cert} --tls-key {server.key} "
            f"--tls-client-ca {issued['ca']}")
    ctx.out(f"agents:     maia-simnode --ca {issued['ca']} --cert-dir {args.dir} ...")
    if args.client:
        stem = args.dir / f"client-{args.client[0]}"
        ctx.out(f"maiactl:    maiactl --ca {issued['ca']} --cert {stem}.pem --key {stem}-key.pem ...")
    return Exit.OK


def _issue(args: argparse.Namespace) -> tuple[dict[str, str], Issued]:
    """The CA (made or reused), the server's certificate and those asked for: what goes where."""
    # Here, not at the top: every maiactl command imports this module to list `dev-ca`, and
    # devca imports `cryptography` (~0.1 s of each maiactl's start).
    from controller import devca

    for flag, names, stem_of in (("--node", args.node, devca.node_stem), ("--client", args.client, devca.client_stem)):
        for name in names:  # every name before the first file is written
            try:
                devca.check_name(name, stem_of(name))
            except ValueError as exc:
                raise CliError(f"dev-ca: {flag} {name!r}: {exc}", Exit.USAGE) from None
    directory: Path = args.dir
    devca.load_or_create_ca(directory)
    issued = {"ca": str(directory / devca.CA_CERT)}
    server = devca.issue_server(directory, tuple(args.server_name) or devca.DEFAULT_SERVER_NAMES)
    issued["server"] = str(server.cert)
    for node_id in args.node:
        issued[f"node/{node_id}"] = str(devca.issue_node(directory, node_id).cert)
    for name in args.client:
        issued[f"client/{name}"] = str(devca.issue_client(directory, name).cert)
    return issued, server
