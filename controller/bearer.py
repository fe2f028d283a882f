"""The asyncio client side of authentication: `authorization: Bearer <token>` on every call.

`maia-simnode` and the tests build their channels with these interceptors, so no call site
passes metadata by hand (maiactl, on blocking channels, has its own in `controller.cli.client`).
`MAIA_TOKEN` and `MAIA_CONTROLLER` are the environment variables both CLIs read. An `aio_channel` retries nothing: the
agents follow `retry-after-ms` in their own loop, and the benchmarks and tests see each answer as
the controller gave it; programs calling the API get `controller.cli.client.open_aio_channel`,
which retries what the controller says to retry (`controller.cli.retry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

TOKEN_ENV = "MAIA_TOKEN"
CONTROLLER_ENV = "MAIA_CONTROLLER"  # where the controller is: both CLIs read it too
AUTHORIZATION_KEY = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    kept = [(k, v) for k, v in (metadata or ()) if k.lower() != AUTHORIZATION_KEY]
    return [*kept, *bearer_metadata(token)]


# --- grpc.aio channels -------------------------------------------------------------------------
class _AioBase:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        return aio.ClientCallDetails(details.method, details.timeout,
                                     aio.Metadata(*_with_token(details.metadata, self._token)),
                                     details.credentials, details.wait_for_ready)


class _AioUnaryUnary(_AioBase, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioBase, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioBase, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioBase, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def aio_interceptors(token: str | None) -> Sequence[aio.ClientInterceptor]:
    """Interceptors for `grpc.aio.*_channel(..., interceptors=...)`; none without a token."""
    if not token:
        return ()
    return (_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token), _AioStreamStream(token))


def aio_channel(address: str, token: str | None, *, credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, Any]] | None = None) -> aio.Channel:
    """An asyncio channel to `address` whose calls carry the token (TLS when `credentials`)."""
    if credentials is not None:
        return aio.secure_channel(address, credentials, options=options, interceptors=aio_interceptors(token))
    return aio.insecure_channel(address, options=options, interceptors=aio_interceptors(token))
