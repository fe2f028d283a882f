"""The interceptor chain builds a method's handler once (`BuiltOncePerMethod`), not per call."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import grpc
from grpc import aio

from controller.api.interceptors import BuiltOncePerMethod
from controller.gcpolicy import YOUNG_THRESHOLD, configure_gc


class _Counting(aio.ServerInterceptor):
    """Wraps the inner handler (a new one per build, like the real interceptors) and counts builds."""

    def __init__(self, built: list[str]) -> None:
        self.built = built

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.built.append(details.method)
        inner = await continuation(details)
        if inner is None:
            return None
        return grpc.unary_unary_rpc_method_handler(inner.unary_unary)


async def _echo(request: Any, context: Any) -> Any:
    return request


async def test_a_methods_handler_is_built_by_its_first_call_and_served_to_every_later_one() -> None:
    outer, inner = [], []
    chain = BuiltOncePerMethod([_Counting(outer), _Counting(inner)])
    registered = {"/maia.v1.S/A": grpc.unary_unary_rpc_method_handler(_echo),
                  "/maia.v1.S/B": grpc.unary_unary_rpc_method_handler(_echo)}
    found: list[str] = []

    async def continuation(details: Any) -> Any:
        found.append(details.method)
        return registered.get(details.method)

    first = await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/A"))
    again = [await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/A")) for _ in range(3)]
    other = await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/B"))
    assert first is not None and all(h is first for h in again)
    assert other is not None and other is not first
    assert outer == inner == found == ["/maia.v1.S/A", "/maia.v1.S/B"]  # both levels ran, in order, once each
    assert await first.unary_unary("ping", None) == "ping"  # the built handler reaches the method's own


async def test_an_unknown_method_is_never_remembered() -> None:
    built: list[str] = []
    chain = BuiltOncePerMethod([_Counting(built)])

    async def continuation(details: Any) -> Any:
        return None

    for _ in range(3):
        assert await chain.intercept_service(continuation, SimpleNamespace(method="/no.Such/Method")) is None
    assert built == ["/no.Such/Method"] * 3
    assert chain._handlers == {}


def test_the_collector_thresholds_are_raised_for_long_running_processes() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        configure_gc()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)
