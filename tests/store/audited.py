"""A call served through the controller's audit interceptor as the gRPC server serves it, without
a server: the entry written with the call's commit, or by the interceptor after it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf.message import Message

from controller.api.auditing import AuditInterceptor
from controller.identity import Principal, reset_principal, set_principal
from controller.store.db import Database


async def through_the_audit_interceptor(db: Database, method: str, request: Message, who: Principal,
                                        behaviour: Callable[[], Awaitable[Any]]) -> Any:
    """`behaviour()` served as `method` (a `/maia.v1.Service/Method`) called by `who` with `request`
    (what the entry names), inside `AuditInterceptor(db)`; returns or raises what the call does."""
    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(lambda request, context: behaviour())

    handler = await AuditInterceptor(db).intercept_service(continuation, SimpleNamespace(method=method))
    token = set_principal(who)
    try:
        return await handler.unary_unary(request, SimpleNamespace(invocation_metadata=lambda: ()))  # no metadata
    finally:
        reset_principal(token)
