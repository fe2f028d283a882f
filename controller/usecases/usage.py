"""Usage reports: what a tenant used, from the usage meter (`controller.store.metering`).

Admins read everyone's, the history of deleted tenants included; a tenant's token reads only its
own tenant's (asking for another tenant is NOT_FOUND, asking for none means its own), from the
tenant's creation on; node tokens read none.
"""

from __future__ import annotations

from datetime import datetime

from controller.errors import InvalidArgument, NotFound
from controller.identity import Principal, Role
from controller.store import metering
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.domain.values import UsageRecord, UsageReport
from controller.usecases import customers, policy
from controller.usecases.policy import require_role
from controller.usecases.validation import check_optional_id

GROUPS = ("tenant", "deployment", "accelerator_model", "zone")


async def usage_report(
    uow: UnitOfWork, who: Principal, *, tenant: str = "", since: datetime | None = None,
    until: datetime | None = None, now: datetime,
) -> UsageReport:
    require_role(who, "reading usage", Role.TENANT)
    check_optional_id("tenant", tenant)
    tenant = policy.visible_tenant(who, tenant, "reading usage")
    if since is not None and until is not None and since >= until:
        raise InvalidArgument(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    end = min(until, now) if until is not None else now
    if since is not None and since >= end:  # a window in the future: it was answered "from 2030 to now", empty
        raise InvalidArgument(f"since ({since.isoformat()}) is not before now ({now.isoformat()}): "
                              "no usage is recorded ahead of time")
    if not who.is_admin:
        # A tenant token reads its own customer's usage (`customers`): the intervals of the one
        # before showed in its report, billed with its own under one deployment name.
        since = await customers.reads_since(uow, who, tenant, since)
        if since is not None and since >= end:
            return UsageReport(since=since, until=end, records=())
    totals = await metering.usage_by(uow.session, GROUPS, now=now, tenant=tenant, since=since, until=end)
    if tenant and not totals and await repo.get_tenant(uow.session, tenant) is None:
        raise NotFound(f"tenant {tenant} not found")  # a deleted tenant's history is still reported
    return UsageReport(since=since, until=end, records=tuple(
        UsageRecord(t.tenant, t.deployment, t.accelerator_model, t.zone, t.accelerator_seconds, t.energy_kwh)
        for t in totals))
