"""The audit log as the API sees it: append an entry, list entries, verify the chain.

`record(db, ...)` is the one append seam outside a plan commit: the API's audit interceptor
writes every mutating call through it, and anything else the controller refuses or decides on
a caller's behalf (a refused agent report, an isolation alarm) can call it too. It writes in its
own short transaction, so a failed call (whose own transaction rolled back) is audited as well.
`EntryWriter.record` does the same for a caller among many: the entries of concurrent callers
(the refused requests of one SubmitDeployments call, a burst of refused calls) are appended in
one transaction, a group commit (`controller.groupcommit`), instead of one each on the
database's single writer. Inside a transaction that must carry its own entries (the plan
commit), use `controller.store.audit.append(session, records)` instead.

Admins list everything, as stored, and verify the chain; a tenant principal lists its own
tenant's entries only (its listing is forced to its tenant), redacted as everything a tenant reads
of other tenants (`controller.usecases.redaction`: an isolation alarm's entry names every tenant
involved) and without the chain's hashes; node credentials may do neither. The redaction is of
what is read: the stored entries, hashed, stay as they were written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from controller.errors import InvalidArgument
from controller.groupcommit import ALONE, GroupCommit, GroupStats, outcome_or_alone
from controller.identity import Principal, Role
from controller.store import audit as store
from controller.store.audit import AuditRecord, CallEntry, ChainReport
from controller.store.db import Database, UnitOfWork
from controller.store.turns import answering
from controller.usecases import customers, paging, policy
from controller.usecases.paging import Page, PageRequest
from controller.usecases.policy import require_admin, require_role
from controller.usecases.validation import check_optional_id, quoted
from controller.usecases.redaction import Redactor, redactor_of

# A SHA-256 as the chain stores it (`store.audit`): what an expected head's hash can be.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("maia.audit")



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


def principal_role(principal: Principal) -> str:
    return principal.role.value


def principal_tenant(principal: Principal) -> str:
    """The tenant a tenant principal is bound to ("" for everyone else)."""
    return principal.tenant if principal.role is Role.TENANT else ""


async def record(db: Database, entry: AuditRecord, *, unless_landed: CallEntry | None = None) -> int | None:
    """Append one entry in its own transaction; returns its seq. `unless_landed`: the call's entry
    as sent by a commit that did not return; when that one landed (`store.landed`: the COMMIT's
    answer was lost) nothing is appended (None): one entry per call."""
    async with db.unit_of_work() as uow:
        if unless_landed is not None and await store.landed(uow.session, unless_landed):
            return None
        (seq,) = await store.append(uow.session, [entry])
        await uow.commit()
    return seq


BATCH_MAX = 256  # entries a transaction of `EntryWriter` appends at most


@dataclass(frozen=True, slots=True)
class _Pending:
    entry: AuditRecord
    unless_landed: CallEntry | None
    # The entry as its batch appended it (`CallEntry.sent`): a batch whose COMMIT's answer was
    # lost may have landed, and the member going alone then asks first (`store.landed`).
    appended: CallEntry


@dataclass(frozen=True, slots=True)
class _Appended:
    seq: int | None  # None: not appended, the call's entry had landed (`record`'s `unless_landed`)


class EntryWriter:
    """`record` for callers that come together: what is queued while a batch commits is
    appended, in the order it came, in the next batch's one transaction (a `GroupCommit`; no
    timer, so an entry alone is written at once). Each caller is answered once its entry's
    transaction committed, as `record` answers; a batch that fails to commit wrote nothing and
    each caller writes its entry alone."""

    def __init__(self, db: Database, *, batch_max: int = BATCH_MAX) -> None:
        self._db = db
        self._group: GroupCommit[_Pending, _Appended] = GroupCommit(
            "audit-entries", lambda batch: self._commit_batch(batch), batch_max=batch_max)

    @property
    def stats(self) -> GroupStats:
        return self._group.stats

    async def record(self, entry: AuditRecord, *, unless_landed: CallEntry | None = None) -> int | None:
        """What `record(db, entry, unless_landed=)` does, committed in a batch."""
        pending = _Pending(entry, unless_landed, CallEntry(entry, None))
        appended = await outcome_or_alone(self._group, pending)
        if appended is not ALONE:
            return appended.seq
        if pending.appended.sent is not None:  # its batch's COMMIT did not answer: it may have landed
            async with self._db.unit_of_work() as uow:
                if await store.landed(uow.session, pending.appended):
                    return pending.appended.sent[0]
        return await record(self._db, entry, unless_landed=unless_landed)

    async def _commit_batch(self, batch: list[_Pending]) -> list[_Appended]:
        with answering():  # their callers wait for the commit: before reports and passes
            async with self._db.unit_of_work() as uow:
                kept = [p for p in batch
                        if p.unless_landed is None or not await store.landed(uow.session, p.unless_landed)]
                if kept:
                    await store.append_calls(uow.session, [p.appended for p in kept])
                await uow.commit()
        appended = {id(p) for p in kept}
        return [_Appended(p.appended.sent[0] if id(p) in appended and p.appended.sent else None) for p in batch]


async def list_events(uow: UnitOfWork, principal: Principal, *, tenant: str = "", since: datetime | None = None,
                      page: PageRequest = PageRequest()) -> Page[AuditEventView]:
    """One page of entries in seq order; a tenant principal sees its own tenant's only."""
    require_role(principal, "listing audit entries", Role.TENANT)
    check_optional_id("tenant", tenant)  # as GetUsage's (a NUL reached PostgreSQL: INTERNAL)
    # A tenant token reads its own entries only: another tenant asked for is NOT_FOUND, as everywhere
    # (it was answered with the caller's own entries, as if they were that tenant's).
    tenant = policy.visible_tenant(principal, tenant, "listing audit entries")
    window = paging.bounds(page, paging.scope_of("audit", tenant=tenant, since=since), (int,))
    after_seq = window.after[0] if window.after else 0
    if not isinstance(after_seq, int) or after_seq < 0:
        raise InvalidArgument("page_token is not a token this list returned; start again without one")
    since = await customers.reads_since(uow, principal, tenant, since)  # not the customer's before
    rows = await store.list_entries(uow.session, tenant=tenant or None, since=since,
                                    after_seq=after_seq, limit=window.limit + 1)
    events = [AuditEventView(**row._asdict()) for row in rows]
    page = paging.page_of(events, window, key=lambda e: (e.seq,))
    if principal.role is not Role.TENANT:
        return page
    redactor = await redactor_of(uow, principal)
    return page.map(lambda entry: as_seen_by_tenant(entry, redactor))


def as_seen_by_tenant(entry: AuditEventView, redactor: Redactor) -> AuditEventView:
    """One of a tenant's entries as its tenant token reads it: what names other tenants redacted
    (another tenant's id and `TENANT/NAME`, the tenants of an alarm but its own), and no `hash`
    or `prev_hash`. Those are the chain's, which admins verify over every tenant's entries: a
    tenant's filtered, redacted list cannot be verified, and the hash of an entry as stored (or,
    as the next entry's `prev_hash`, of another tenant's entry) would let it test its guesses of
    what was redacted.

    The tenant a refused call of its own named (`requested_tenant`, which the caller chose) is
    redacted wherever it stands, whether or not such a tenant exists: redacting the ids of the
    tenants there are only would let a tenant test its guesses of other tenants' ids ("tenant
    bravo not found" read "another tenant not found", "tenant zzz not found" as it was). It is
    a second pass of its own (a pattern of one id): a redactor of every tenant's ids and this
    one, made again for each such entry, took 12 ms an entry at 500 tenants."""
    seen = _redacted(entry, redactor)
    named = entry.detail.get("requested_tenant")
    if isinstance(named, str) and named and named != redactor.viewer:
        seen = _redacted(seen, Redactor((named,), viewer=redactor.viewer))
    return replace(seen, prev_hash="", hash="")


def _redacted(entry: AuditEventView, redactor: Redactor) -> AuditEventView:
    return replace(entry, request_id=redactor.text(entry.request_id), actor=redactor.text(entry.actor),
                   object_id=redactor.text(entry.object_id), detail=redactor.detail(entry.detail))


async def verify(db: Database, principal: Principal, *,
                 expected_head: tuple[int, str] | None = None) -> ChainReport:
    """Check the whole chain (see `controller.store.audit.verify_chain`); admins only (the chain
    covers every tenant's entries). Read in one snapshot (`Database.read_snapshot`): the head
    and the entries as of one moment, so that entries appended while it reads (every audited
    call appends one) are not taken for entries "appended outside the controller"."""
    require_admin(principal, "verifying the audit log")
    if expected_head is not None:
        seq, head_hash = expected_head
        if seq < 0:
            raise InvalidArgument(f"expected_head_seq must be >= 0, got {seq}")
        if head_hash and not seq:  # it was ignored: "intact", nothing checked
            raise InvalidArgument("expected_head_hash needs expected_head_seq (the entry it is the hash of)")
        if head_hash and not _SHA256_HEX.fullmatch(head_hash):
            # Not a hash this log could hold: a typo, not a rewritten log (it was told as one, a
            # tamper alarm logged at ERROR).
            raise InvalidArgument(f"expected_head_hash must be 64 lowercase hex digits (a SHA-256, as maiactl "
                                  f"audit verify prints it), got {quoted(head_hash, 20)}")
    async with db.read_snapshot() as session:
        report = await store.verify_chain(session, expected_head=expected_head)
    if not report.intact:
        log.error("audit log verification failed at entry %s: %s", report.first_bad_seq, report.problem)
    return report
