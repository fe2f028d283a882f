"""Interleavings for the tests of a Register or ApplyTopology whose rack, row or zone another call
deleted after the request read it (tests/controller/test_topology_item_gone.py over the use cases,
tests/integration/test_api_topology_item_gone.py over gRPC): made deterministic by running the
other call at the seam itself, no sleeps. Each records the state (`state()`: the rows, or what the
API answers) as the other call left it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from controller.store import repositories as repo

T = TypeVar("T")


def after_first_read(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, act: Callable[[], Awaitable[Any]],
                     state: Callable[[], Awaitable[T]]) -> list[T]:
    """`module.name` (a read of the request's, unlocked) is followed, the first time it is called,
    by `act()` (a DeleteRack, DeleteRow or DeleteZone of its own); the state as that left it."""
    read, acted = getattr(module, name), []

    async def then_acted(*args: Any, **kwargs: Any) -> Any:
        out = await read(*args, **kwargs)
        if not acted:
            await act()
            acted.append(await state())
        return out

    monkeypatch.setattr(module, name, then_acted)
    return acted


def applied_again_before_reread(monkeypatch: pytest.MonkeyPatch, apply: Callable[[], Awaitable[Any]],
                                state: Callable[[], Awaitable[T]]) -> list[T]:
    """The first read of stored ids after each foreign-key refusal of a parent gone
    (`repo.topology_parent_gone`, the use case's re-read of what is gone) is preceded by `apply()`
    (an apply of its own): the parent deleted after the request read it is back as it reads
    again. The state as each such apply left it."""
    parent_gone, existing_ids = repo.topology_parent_gone, repo.existing_ids
    refusals: list[BaseException] = []
    applied: list[Any] = []

    def seen(exc: BaseException) -> bool:
        gone = parent_gone(exc)
        if gone:
            refusals.append(exc)
        return gone

    async def read_after_applied(*args: Any, **kwargs: Any) -> Any:
        if len(refusals) > len(applied):
            applied.append(None)  # taken: the apply's own reads go through
            await apply()
            applied[-1] = await state()
        return await existing_ids(*args, **kwargs)

    monkeypatch.setattr(repo, "topology_parent_gone", seen)
    monkeypatch.setattr(repo, "existing_ids", read_after_applied)
    return applied
