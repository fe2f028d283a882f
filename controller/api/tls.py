"""TLS for the controller's port, and mutual TLS for node agents.

`--tls-cert/--tls-key` serve TLS. `--tls-client-ca` adds mutual TLS: every client must then
present a certificate signed by that CA (maiactl: `--cert/--key`), and on NodeAgentService the
certificate must name the node it speaks for: its common name is the node id (as `maiactl
dev-ca --node ID` issues them). `Register` for another node id, or a `Connect` whose Hello names
another node, is refused with PERMISSION_DENIED, so a stolen or mis-issued certificate of one
node cannot take over another. Which operations a client may perform is still decided by its
bearer token; the certificate only proves which machine is on the other end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from controller.errors import MaiaError, PermissionDenied, Unauthenticated
from controller.preflight import StartupError
from controller.tlsfiles import CertificateFiles, MismatchedFiles, UnreadableFile

AGENT_SERVICE = "/maia.v1.NodeAgentService/"
_COMMON_NAME = "x509_common_name"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, client certificates required and checked

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `server.add_secure_port` that follow the files (`tlsfiles.CertificateFiles`):
        read now (one that cannot be read fails start-up with a `StartupError` naming its flag),
        and again when they are replaced."""
        try:
            return CertificateFiles(self.cert, self.key, self.client_ca).server_credentials()
        except UnreadableFile as exc:
            raise StartupError(str(exc), "check the path and that this user may read the file") from exc
        except MismatchedFiles as exc:
            raise StartupError(str(exc), "give the certificate (chain) in PEM and its own unencrypted key") from exc


def certificate_name(context: aio.ServicerContext) -> str | None:
    """The common name of the peer's verified client certificate, if it presented one."""
    values = (context.auth_context() or {}).get(_COMMON_NAME) or []
    return values[0].decode() if values else None


def _refusal(certified: str | None, node_id: str) -> MaiaError:
    if certified is None:
        return Unauthenticated("node agents must present a client certificate (mutual TLS)")
    if ":" in certified:  # no node id has one: a tool's certificate (devca.TOOL_PREFIX) or another kind
        return PermissionDenied(f"the client certificate ({certified[:80]!r}) names no node; node {node_id[:128]!r} "
                                f"needs its own")
    return PermissionDenied(f"the client certificate is for node {certified!r}, not {node_id[:128]!r}")


class NodeCertificateInterceptor(aio.ServerInterceptor):
    """On NodeAgentService: the node id of Register and of Connect's Hello must be the one the
    client certificate names (installed only with mutual TLS, inside the error translation and
    the audit interceptor, so a refusal is audited before its status is sent)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(AGENT_SERVICE):
            return handler
        if handler.unary_unary is not None:
            return self._unary(handler)
        if handler.stream_stream is not None:
            return self._stream(handler)
        return handler

    @staticmethod
    def _unary(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary

        async def checked(request: Any, context: aio.ServicerContext) -> Any:
            node_id = request.node.node_id if hasattr(request, "node") else ""
            certified = certificate_name(context)
            if certified is None or certified != node_id:
                raise _refusal(certified, node_id)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    @staticmethod
    def _stream(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = handler.stream_stream

        async def checked(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            certified = certificate_name(context)
            if certified is None:
                raise _refusal(None, "")

            async def verified() -> AsyncIterator[Any]:
                first = True
                async for message in requests:
                    if (first and hasattr(message, "WhichOneof")  # not a MalformedRequest (refused inside)
                            and message.WhichOneof("body") == "hello" and message.hello.node_id != certified):
                        raise _refusal(certified, message.hello.node_id)
                    first = False
                    yield message

            async for reply in behaviour(verified(), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(checked, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
