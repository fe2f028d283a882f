"""`python -m controller.healthcheck [HOST:PORT] [--ca FILE [--cert FILE --key FILE]]`: exit 0
when the controller's gRPC health service says SERVING, 1 otherwise (not serving, unreachable,
or no answer in 3 s), 2 for a bad flag or an unreadable file.

The container image's HEALTHCHECK runs it; nothing but grpcio and the health stubs the
controller already depends on, so the image needs no extra probe binary. A controller serving
TLS (`--tls-cert`) is checked over TLS: `--ca` (or `$MAIA_CA`, as maiactl reads it) is the CA
bundle its certificate is checked against, `--cert`/`--key` (`$MAIA_CERT`, `$MAIA_KEY`) a client
certificate where it asks for one (`--tls-client-ca`), and `--server-name` the name its
certificate is checked for when the address is not one of them (probing 127.0.0.1 inside the
container: the certificate names the service).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Tls:
    """What a TLS check sends: the CA bundle, a client certificate and key, the name checked."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""


def check(address: str, *, timeout_s: float = TIMEOUT_S, tls: Tls | None = None) -> str:
    """The overall health status name ('SERVING', 'NOT_SERVING', ...) or why there is none."""
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert), options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controller.healthcheck",
                                description="exit 0 when the controller's gRPC health says SERVING, else 1")
    p.add_argument("address", nargs="?", default=DEFAULT_ADDRESS, help=f"HOST:PORT (default {DEFAULT_ADDRESS})")
    p.add_argument("--ca", default=os.environ.get("MAIA_CA"), metavar="FILE",
                   help="PEM CA bundle: check over TLS ($MAIA_CA)")
    p.add_argument("--cert", default=os.environ.get("MAIA_CERT"), metavar="FILE",
                   help="PEM client certificate, for a controller that asks for one ($MAIA_CERT)")
    p.add_argument("--key", default=os.environ.get("MAIA_KEY"), metavar="FILE", help="PEM key of --cert ($MAIA_KEY)")
    p.add_argument("--server-name", default="", metavar="NAME",
                   help="the name the controller's certificate is checked for (default: the address's host)")
    return p


def _tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tls | None:
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if not args.ca:
        if args.cert or args.server_name:
            parser.error("--cert, --key and --server-name need --ca (TLS)")
        return None
    read: dict[str, bytes | None] = {}
    for flag in ("ca", "cert", "key"):
        path = getattr(args, flag)
        try:
            read[flag] = Path(path).read_bytes() if path else None
        except OSError as exc:
            parser.error(f"--{flag} {path}: cannot read it: {exc.strerror or exc}")
    ca = read["ca"]
    assert ca is not None
    return Tls(ca, read["cert"], read["key"], args.server_name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    status = check(args.address, tls=_tls(parser, args))
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
