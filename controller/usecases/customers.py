"""A tenant id deleted and created again is a new customer (`tenants.delete_tenant`): what its
tenant token reads of the history (usage, the audit log, events, the console's usage) starts at
its tenant's creation. Admins read all of it, the customers before included."""

from __future__ import annotations

from datetime import datetime

from controller.identity import Principal, Role
from controller.store import repositories as repo
from controller.store.db import UnitOfWork


async def reads_since(uow: UnitOfWork, who: Principal, tenant: str, since: datetime | None) -> datetime | None:
    """`since`, or for a tenant token its tenant's creation where that is later."""
    if who.role is not Role.TENANT or not tenant:
        return since
    born = await repo.tenant_created_at(uow.session, tenant)
    if born is not None and (since is None or since < born):
        return born
    return since
