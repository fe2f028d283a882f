"""The connection to the controller and the translation of gRPC failures into CLI errors.

Commands get a `Controller` with lazily created stubs; any `grpc.RpcError` that escapes a
command is printed by `main` as `error: <CODE>: <details>` (exit 1), never as a traceback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import grpc

from maia.v1 import admin_pb2_grpc, deployments_pb2_grpc

DEFAULT_CONTROLLER = "127.0.0.1:50051"
ENV_CONTROLLER = "MAIA_CONTROLLER"


class CliError(Exception):
    """An error already phrased for the user; `exit_code` 1 for failures, 2 for bad input."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_address(flag: str | None) -> str:
    """--controller wins, then $MAIA_CONTROLLER, then the default."""
    return flag or os.environ.get(ENV_CONTROLLER) or DEFAULT_CONTROLLER


@dataclass
class Controller:
    """Stubs over one channel to the controller at `address`; `timeout` is per call (seconds)."""

    address: str
    timeout: float = 15.0
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def deployments(self) -> deployments_pb2_grpc.DeploymentServiceStub:
        return deployments_pb2_grpc.DeploymentServiceStub(self.channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def rpc_error_text(error: grpc.RpcError, address: str) -> str:
    """'error: NOT_FOUND: deployment foo not found', clearer when the controller is unreachable."""
    code = status_code(error)
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"error: UNAVAILABLE: cannot reach the controller at {address} ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"error: DEADLINE_EXCEEDED: the controller at {address} did not answer in time ({details})"
    return f"error: {name}: {details}"


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if hasattr(error, "code") else None
