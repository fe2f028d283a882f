"""`python -m controller.healthcheck [HOST:PORT]`: exit 0 when the controller's gRPC health
service says SERVING, 1 otherwise (not serving, unreachable, or no answer in 3 s).

The container image's HEALTHCHECK runs it; nothing but grpcio and the health stubs the
controller already depends on, so the image needs no extra probe binary.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT_S = 3.0


def check(address: str, *, timeout_s: float = TIMEOUT_S) -> str:
    """The overall health status name ('SERVING', 'NOT_SERVING', ...) or why there is none."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    address = args[0] if args else DEFAULT_ADDRESS
    status = check(address)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
