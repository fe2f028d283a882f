"""The events history (what happened to deployments, nodes, tenants), read for operators."""

from __future__ import annotations

from controller.errors import InvalidArgument, NotFound, PermissionDenied
from controller.identity import Principal, Role
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases import policy
from controller.domain.values import EventView

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
    await _check_visible(uow, who, object_kind, object_id)
    return await repo.list_events(uow.session, object_kind=object_kind, object_id=object_id, after_id=after_id,
                                  limit=min(limit or DEFAULT_LIMIT, MAX_LIMIT))


async def _check_visible(uow: UnitOfWork, who: Principal, object_kind: str, object_id: str) -> None:
    """Admins read every event; a tenant token only those of one of its own deployments or of its
    own tenant (the history names other tenants' deployments and nodes); other roles none."""
    if who.is_admin:
        return
    policy.require_role(who, "listing events", Role.TENANT)
    if object_kind == "tenant" and object_id:
        policy.visible_tenant(who, object_id, "listing events")  # another tenant's: NOT_FOUND
        return
    if object_kind == "deployment" and object_id:
        row = await repo.get_deployment(uow.session, object_id)
        if row is None or not policy.may_see_tenant(who, row.tenant_id):
            raise NotFound(f"deployment {object_id} not found")
        return
    raise PermissionDenied("a tenant token lists the events of one of its own deployments "
                           "(object_kind deployment, object_id NAME) or of its tenant; the rest needs an admin token")
