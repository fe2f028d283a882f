"""The audit log as the API sees it: append an entry, list entries, verify the chain.

`record(db, ...)` is the one append seam outside a plan commit: the API's audit interceptor
writes every mutating call through it, and anything else the controller refuses or decides on
a caller's behalf (a refused agent report, an isolation alarm) can call it too. It writes in its
own short transaction, so a failed call (whose own transaction rolled back) is audited as well.
Inside a transaction that must carry its own entries (the plan commit), use
`controller.store.audit.append(session, records)` instead.

Admins list everything and verify the chain; a tenant principal lists its own tenant's entries
only (its listing is forced to its tenant); node credentials may do neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.errors import InvalidArgument
from controller.identity import Principal, Role
from controller.store import audit as store
from controller.store.audit import AuditRecord, ChainReport
from controller.store.db import Database, UnitOfWork
from controller.usecases.policy import require_admin, require_role

log = logging.getLogger("maia.audit")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class AuditEventView:
    seq: int
    at: datetime
    request_id: str
    actor: str
    role: str
    tenant: str
    action: str
    object_kind: str
    object_id: str
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: tuple[AuditEventView, ...]
    next_page_token: str  # "" on the last page


def principal_role(principal: Principal) -> str:
    return principal.role.value


def principal_tenant(principal: Principal) -> str:
    """The tenant a tenant principal is bound to ("" for everyone else)."""
    return principal.tenant if principal.role is Role.TENANT else ""


async def record(db: Database, entry: AuditRecord) -> int:
    """Append one entry in its own transaction; returns its seq."""
    async with db.unit_of_work() as uow:
        (seq,) = await store.append(uow.session, [entry])
        await uow.commit()
    return seq


def _page_after(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise InvalidArgument(f"page_token {token[:32]!r} is not a token this server issued")
    return int(token)


async def list_events(uow: UnitOfWork, principal: Principal, *, tenant: str = "", since: datetime | None = None,
                      page_size: int = 0, page_token: str = "") -> AuditPage:
    """One page of entries in seq order; a tenant principal sees its own tenant's only."""
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}, got {page_size}")
    require_role(principal, "listing audit entries", Role.TENANT)
    size = page_size or DEFAULT_PAGE_SIZE
    if principal.role is Role.TENANT:  # its own entries only, whatever it asked for
        tenant = principal.tenant
    rows = await store.list_entries(uow.session, tenant=tenant or None, since=since,
                                    after_seq=_page_after(page_token), limit=size + 1)
    events = tuple(AuditEventView(**row._asdict()) for row in rows[:size])
    return AuditPage(events, str(events[-1].seq) if len(rows) > size else "")


async def verify(uow: UnitOfWork, principal: Principal, *,
                 expected_head: tuple[int, str] | None = None) -> ChainReport:
    """Check the whole chain (see `controller.store.audit.verify_chain`); admins only (the chain
    covers every tenant's entries)."""
    require_admin(principal, "verifying the audit log")
    if expected_head is not None and expected_head[0] < 0:
        raise InvalidArgument(f"expected_head_seq must be >= 0, got {expected_head[0]}")
    report = await store.verify_chain(uow.session, expected_head=expected_head)
    if not report.intact:
        log.error("audit log verification failed at entry %s: %s", report.first_bad_seq, report.problem)
    return report
