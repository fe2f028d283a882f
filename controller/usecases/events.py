"""The events history (what happened to deployments, nodes, tenants), read for operators."""

from __future__ import annotations

from controller.errors import InvalidArgument
from controller.identity import Principal
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases.domain import EventView

OBJECT_KINDS = ("deployment", "node", "tenant", "topology")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


async def list_events(uow: UnitOfWork, who: Principal, *, object_kind: str = "", object_id: str = "",
                      after_id: int = 0, limit: int = 0) -> list[EventView]:
    if object_kind and object_kind not in OBJECT_KINDS:
        raise InvalidArgument(f"object_kind {object_kind!r}: expected one of {', '.join(OBJECT_KINDS)}")
    if object_id and not object_kind:
        raise InvalidArgument("object_id needs object_kind")
    if limit < 0 or after_id < 0:
        raise InvalidArgument("limit and after_id must not be negative")
    return await repo.list_events(uow.session, object_kind=object_kind, object_id=object_id, after_id=after_id,
                                  limit=min(limit or DEFAULT_LIMIT, MAX_LIMIT))
